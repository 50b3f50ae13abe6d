using System.Runtime.InteropServices;
using OffloadRpc.Interop;

namespace OffloadRpc.Transport;

/// <summary>
/// One anonymous memfd mapped shared. Owns the pointer arithmetic: every access goes through
/// <see cref="Pointer"/>, which checks bounds. The mapping is reference counted so that leases
/// handed to user code keep it alive after its connection closes; the last release unmaps it.
/// </summary>
internal sealed unsafe class SharedMemorySegment
{
    /// <summary>The seals a receiver requires before it maps a peer's segment.</summary>
    public const int RequiredSeals = LinuxNative.F_SEAL_SHRINK | LinuxNative.F_SEAL_GROW;

    private static long s_mappedBytes;
    private static long s_liveSegments;

    private readonly byte* _base;
    private int _fd;
    private int _references = 1;

    private SharedMemorySegment(int id, int fd, byte* address, long size)
    {
        Id = id;
        _fd = fd;
        _base = address;
        Size = size;
        Interlocked.Add(ref s_mappedBytes, size);
        Interlocked.Increment(ref s_liveSegments);
    }

    /// <summary>Bytes of shared memory this process has mapped right now, over all connections.</summary>
    public static long MappedBytes => Volatile.Read(ref s_mappedBytes);

    /// <summary>How many segments this process has mapped right now.</summary>
    public static long LiveSegments => Volatile.Read(ref s_liveSegments);

    public int Id { get; }

    public long Size { get; }

    /// <summary>The memfd, kept open so it can be passed to the peer; -1 once closed.</summary>
    public int FileDescriptor => _fd;

    public byte* Base => _base;

    /// <summary>Creates a sealed memfd of <paramref name="size"/> bytes and maps it read-write.</summary>
    public static SharedMemorySegment Create(int id, long size, string name, bool populate)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(size);

        int fd = LinuxNative.MemfdCreate(name, LinuxNative.MFD_CLOEXEC | LinuxNative.MFD_ALLOW_SEALING);
        if (fd < 0)
        {
            throw Failure("memfd_create");
        }

        try
        {
            if (LinuxNative.Ftruncate(fd, size) != 0)
            {
                throw Failure("ftruncate");
            }

            if (LinuxNative.Fcntl(fd, LinuxNative.F_ADD_SEALS, RequiredSeals | LinuxNative.F_SEAL_SEAL) != 0)
            {
                throw Failure("fcntl(F_ADD_SEALS)");
            }

            byte* address = Map(fd, size, populate);
            return new SharedMemorySegment(id, fd, address, size);
        }
        catch
        {
            LinuxNative.Close(fd);
            throw;
        }
    }

    /// <summary>
    /// Maps a segment received from the peer after checking that it cannot shrink or grow under us
    /// (a shrink would turn our reads into SIGBUS) and that its size is the announced one.
    /// Takes ownership of <paramref name="fd"/> whether it succeeds or not.
    /// </summary>
    public static SharedMemorySegment MapPeer(int id, int fd, long expectedSize, long maxSize)
    {
        try
        {
            int seals = LinuxNative.Fcntl(fd, LinuxNative.F_GET_SEALS, 0);
            if (seals < 0)
            {
                throw new ProtocolViolationException($"Peer sent segment {id} that is not a sealable memfd (F_GET_SEALS failed, errno {Marshal.GetLastPInvokeError()}).");
            }

            if ((seals & RequiredSeals) != RequiredSeals)
            {
                throw new ProtocolViolationException($"Peer sent segment {id} that is not sealed against resizing (seals 0x{seals:x}, required 0x{RequiredSeals:x}).");
            }

            // Only ordinary shared memory (tmpfs/shmem): a hugetlbfs memfd could fault with SIGBUS when its pool runs dry.
            long filesystem = LinuxNative.FileSystemType(fd);
            if (filesystem != LinuxNative.TMPFS_MAGIC)
            {
                throw new ProtocolViolationException($"Peer sent segment {id} that is not anonymous shared memory (file system 0x{filesystem:x}).");
            }

            long actual = LinuxNative.Lseek(fd, 0, LinuxNative.SEEK_END);
            if (actual != expectedSize || expectedSize <= 0 || expectedSize > maxSize)
            {
                throw new ProtocolViolationException($"Peer sent segment {id} of {actual} bytes but announced {expectedSize} (limit {maxSize}).");
            }

            byte* address = Map(fd, expectedSize, populate: false);
            return new SharedMemorySegment(id, fd, address, expectedSize);
        }
        catch
        {
            LinuxNative.Close(fd);
            throw;
        }
    }

    private static byte* Map(int fd, long size, bool populate)
    {
        int flags = LinuxNative.MAP_SHARED | (populate ? LinuxNative.MAP_POPULATE : 0);
        nint address = LinuxNative.Mmap(0, (nuint)size, LinuxNative.PROT_READ | LinuxNative.PROT_WRITE, flags, fd, 0);
        if (address == LinuxNative.MAP_FAILED)
        {
            throw Failure("mmap");
        }

        return (byte*)address;
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

        return _base + offset;
    }

    /// <summary>Takes another reference; false when the segment is already unmapped.</summary>
    public bool TryAddReference()
    {
        int current = Volatile.Read(ref _references);
        while (current > 0)
        {
            int seen = Interlocked.CompareExchange(ref _references, current + 1, current);
            if (seen == current)
            {
                return true;
            }

            current = seen;
        }

        return false;
    }

    /// <summary>Drops a reference; the last one unmaps the segment and closes its memfd.</summary>
    public void Release()
    {
        int remaining = Interlocked.Decrement(ref _references);
        if (remaining == 0)
        {
            CloseDescriptor();
            LinuxNative.Munmap((nint)_base, (nuint)Size);
            Interlocked.Add(ref s_mappedBytes, -Size);
            Interlocked.Decrement(ref s_liveSegments);
        }
        else if (remaining < 0)
        {
            throw new InvalidOperationException($"Segment {Id} released more often than referenced.");
        }
    }

    /// <summary>Closes the memfd once it has been passed on; the mapping stays.</summary>
    public void CloseDescriptor()
    {
        int fd = Interlocked.Exchange(ref _fd, -1);
        if (fd >= 0)
        {
            LinuxNative.Close(fd);
        }
    }
}
