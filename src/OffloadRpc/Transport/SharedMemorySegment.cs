using System.Diagnostics;
using System.Runtime.InteropServices;
using OffloadRpc.Interop;

namespace OffloadRpc.Transport;

/// <summary>
/// One anonymous memfd mapped shared. Owns the pointer arithmetic: every access goes through
/// <see cref="Pointer"/>, which checks bounds.
/// <para>
/// The memfd is owned by a <see cref="SafeMemfdHandle"/> (kept open only until it has been passed to
/// the peer), the mapping by a <see cref="SafeMappingHandle"/> whose own reference count is the
/// mapping's lifetime. The owner (the arena, the connection, the handshake, the caller of
/// <see cref="Create"/>) holds the handle's own reference and drops it with <see cref="Dispose"/>.
/// Every other holder (a lease, a pin, a message in flight, a payload being received, a thread
/// touching a wake word) takes one with <see cref="TryAddReference"/> and gives it back with
/// <see cref="Release"/>. A reference can be added while any is held, so leases handed to user code
/// keep the mapping, and can still be pinned, after their connection closes; the last one unmaps.
/// </para>
/// </summary>
internal sealed unsafe class SharedMemorySegment : IDisposable
{
    /// <summary>The seals a receiver requires before it maps a peer's segment.</summary>
    public const int RequiredSeals = LinuxNative.F_SEAL_SHRINK | LinuxNative.F_SEAL_GROW;

    private readonly SafeMappingHandle _mapping;
    private readonly byte* _base;
    private SafeMemfdHandle? _descriptor;
    private int _disposed;

    private SharedMemorySegment(int id, SafeMemfdHandle? descriptor, SafeMappingHandle mapping)
    {
        Debug.Assert(!mapping.IsInvalid && !mapping.IsClosed, "a segment is made over a live mapping");
        Debug.Assert(descriptor is null || !descriptor.IsInvalid, "a segment keeps a valid memfd or none");
        Id = id;
        _descriptor = descriptor;
        _mapping = mapping;
        _base = (byte*)mapping.DangerousGetHandle(); // valid for as long as a reference is held
        Size = (long)mapping.ByteLength;
    }

    /// <summary>Bytes of shared memory this process has mapped right now, over all connections.</summary>
    public static long MappedBytes => SafeMappingHandle.MappedBytes;

    /// <summary>How many segments this process has mapped right now.</summary>
    public static long LiveSegments => SafeMappingHandle.LiveMappings;

    public int Id { get; }

    public long Size { get; }

    /// <summary>The memfd, to pass to the peer; throws once <see cref="CloseDescriptor"/> closed it (a peer's segment never has one).</summary>
    public SafeMemfdHandle Descriptor =>
        Volatile.Read(ref _descriptor) ?? throw new ObjectDisposedException(nameof(SharedMemorySegment), $"The memfd of segment {Id} is closed.");

    /// <summary>False once the last reference is gone and the memory is unmapped.</summary>
    public bool IsMapped => !_mapping.IsClosed;

    public byte* Base
    {
        get
        {
            Debug.Assert(IsMapped, "a pointer is formed only under a reference");
            return _base;
        }
    }

    /// <summary>Creates a sealed memfd of <paramref name="size"/> bytes and maps it read-write.</summary>
    public static SharedMemorySegment Create(int id, long size, string name, bool populate)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(size);

        SafeMemfdHandle descriptor = LinuxNative.MemfdCreateHandle(name, LinuxNative.MFD_CLOEXEC | LinuxNative.MFD_ALLOW_SEALING);
        try
        {
            if (descriptor.IsInvalid)
            {
                throw Failure("memfd_create");
            }

            if (LinuxNative.Ftruncate(descriptor, size) != 0)
            {
                throw Failure("ftruncate");
            }

            if (LinuxNative.Fcntl(descriptor, LinuxNative.F_ADD_SEALS, RequiredSeals | LinuxNative.F_SEAL_SEAL) != 0)
            {
                throw Failure("fcntl(F_ADD_SEALS)");
            }

            return new SharedMemorySegment(id, descriptor, Map(descriptor, size, populate));
        }
        catch
        {
            descriptor.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Maps a segment received from the peer after checking that it cannot shrink or grow under us
    /// (a shrink would turn our reads into SIGBUS) and that its size is the announced one.
    /// Takes ownership of <paramref name="descriptor"/> whether it succeeds or not, and closes it: a
    /// peer's segment is never passed on, the mapping is all that is kept.
    /// </summary>
    public static SharedMemorySegment MapPeer(int id, SafeMemfdHandle descriptor, long expectedSize, long maxSize)
    {
        using (descriptor)
        {
            int seals = LinuxNative.Fcntl(descriptor, LinuxNative.F_GET_SEALS, 0);
            if (seals < 0)
            {
                throw new ProtocolViolationException($"Peer sent segment {id} that is not a sealable memfd (F_GET_SEALS failed, errno {Marshal.GetLastPInvokeError()}).");
            }

            if ((seals & RequiredSeals) != RequiredSeals)
            {
                throw new ProtocolViolationException($"Peer sent segment {id} that is not sealed against resizing (seals 0x{seals:x}, required 0x{RequiredSeals:x}).");
            }

            // Only ordinary shared memory (tmpfs/shmem): a hugetlbfs memfd could fault with SIGBUS when its pool runs dry.
            long filesystem = LinuxNative.FileSystemType(descriptor);
            if (filesystem != LinuxNative.TMPFS_MAGIC)
            {
                throw new ProtocolViolationException($"Peer sent segment {id} that is not anonymous shared memory (file system 0x{filesystem:x}).");
            }

            long actual = LinuxNative.Lseek(descriptor, 0, LinuxNative.SEEK_END);
            if (actual != expectedSize || expectedSize <= 0 || expectedSize > maxSize)
            {
                throw new ProtocolViolationException($"Peer sent segment {id} of {actual} bytes but announced {expectedSize} (limit {maxSize}).");
            }

            return new SharedMemorySegment(id, descriptor: null, Map(descriptor, expectedSize, populate: false));
        }
    }

    private static SafeMappingHandle Map(SafeMemfdHandle descriptor, long size, bool populate)
    {
        SafeMappingHandle mapping = SafeMappingHandle.Map(descriptor, size, populate);
        if (mapping.IsInvalid)
        {
            OffloadRpcException failure = Failure("mmap"); // reads errno before anything else runs
            mapping.Dispose();
            throw failure;
        }

        return mapping;
    }

    private static OffloadRpcException Failure(string call)
    {
        int errno = Marshal.GetLastPInvokeError();
        return new OffloadRpcException($"{call} failed: {Marshal.GetPInvokeErrorMessage(errno)} (errno {errno}).");
    }

    /// <summary>True when [offset, offset+length) lies inside the segment; overflow-safe.</summary>
    public bool Contains(long offset, long length) => offset >= 0 && length >= 0 && offset <= Size && length <= Size - offset;

    /// <summary>A pointer to [offset, offset+length) after a bounds check.</summary>
    public byte* Pointer(long offset, long length)
    {
        if (!Contains(offset, length))
        {
            throw new ArgumentOutOfRangeException(nameof(offset), $"[{offset}, +{length}) is outside segment {Id} of {Size} bytes.");
        }

        Debug.Assert(IsMapped, "a pointer is formed only under a reference");
        return _base + offset;
    }

    /// <summary>
    /// Takes a reference for a holder other than the owner; give it back with <see cref="Release"/>.
    /// Succeeds while any reference is held (the owner's or another holder's); false once the last one
    /// is gone and the segment is unmapped or being unmapped.
    /// </summary>
    public bool TryAddReference()
    {
        bool added = false;
        try
        {
            _mapping.DangerousAddRef(ref added);
        }
        catch (ObjectDisposedException)
        {
            Debug.Assert(!added, "a failed DangerousAddRef added nothing");
        }

        return added;
    }

    /// <summary>
    /// Gives back a reference taken with <see cref="TryAddReference"/>; the last one unmaps the segment.
    /// Never the owner's (that is <see cref="Dispose"/>).
    /// </summary>
    /// <exception cref="InvalidOperationException">No reference was left to give back.</exception>
    public void Release()
    {
        try
        {
            _mapping.DangerousRelease();
        }
        catch (ObjectDisposedException ex)
        {
            throw new InvalidOperationException($"Segment {Id} released more often than referenced.", ex);
        }
    }

    /// <summary>
    /// The owner lets go: closes the memfd if it is still open and drops the owner's reference (the
    /// mapping handle's own). The mapping stays while other holders have references. Idempotent.
    /// </summary>
    /// <exception cref="InvalidOperationException">The segment was already unmapped: a holder released once too often, taking the owner's reference.</exception>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
        {
            return;
        }

        CloseDescriptor();
        try
        {
            _mapping.Dispose();
        }
        catch (ObjectDisposedException ex)
        {
            // The handle's finalizer finds it closed and leaves it (SafeMappingHandle.Dispose(bool)).
            throw new InvalidOperationException($"Segment {Id} was unmapped before its owner let go: a reference was released more often than taken.", ex);
        }
    }

    /// <summary>Closes the memfd once it has been passed on; the mapping stays.</summary>
    public void CloseDescriptor() => Interlocked.Exchange(ref _descriptor, null)?.Dispose();
}
