using System.Diagnostics;
using System.Runtime.InteropServices;

namespace OffloadRpc.Interop;

/// <summary>
/// Owns one shared mapping of a memfd (its base address and length), as the runtime's
/// SafeMemoryMappedViewHandle owns a view: the last reference unmaps it.
/// <para>
/// References: the creator's is the handle's own and is dropped by <see cref="SafeHandle.Dispose()"/>
/// (never by <see cref="SafeHandle.DangerousRelease"/>: the finalizer would then find no reference left
/// to drop). Everyone else who keeps the memory (a lease, a pin, a message in flight, a read in
/// progress) takes one with <see cref="SafeHandle.DangerousAddRef"/> and gives it back with
/// <see cref="SafeHandle.DangerousRelease"/>. SafeHandle refuses a new reference only once the count has
/// reached zero (IsClosed), not merely after Dispose: a lease can still be pinned after the
/// connection that owned its segment is gone, as long as the lease holds its own reference.
/// </para>
/// Also keeps the process-wide counters of mapped bytes and live mappings.
/// </summary>
internal sealed class SafeMappingHandle : SafeBuffer
{
    private static long s_mappedBytes;
    private static long s_liveMappings;

    /// <summary>An invalid handle; <see cref="Map"/> fills it.</summary>
    public SafeMappingHandle()
        : base(ownsHandle: true)
    {
    }

    /// <summary>Bytes of shared memory this process has mapped right now, over all connections.</summary>
    public static long MappedBytes => Volatile.Read(ref s_mappedBytes);

    /// <summary>How many mappings this process holds right now.</summary>
    public static long LiveMappings => Volatile.Read(ref s_liveMappings);

    /// <summary>
    /// Maps <paramref name="size"/> bytes of <paramref name="descriptor"/> shared and read-write.
    /// On failure the handle is invalid and <see cref="Marshal.GetLastPInvokeError"/> holds the errno.
    /// </summary>
    public static SafeMappingHandle Map(SafeMemfdHandle descriptor, long size, bool populate)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(size);
        var mapping = new SafeMappingHandle(); // allocated before the mapping exists: nothing to leak if this throws
        int flags = LinuxNative.MAP_SHARED | (populate ? LinuxNative.MAP_POPULATE : 0);
        nint address = LinuxNative.Mmap(0, (nuint)size, LinuxNative.PROT_READ | LinuxNative.PROT_WRITE, flags, descriptor, 0);
        if (address == LinuxNative.MAP_FAILED)
        {
            return mapping; // invalid: its Dispose and finalizer release nothing
        }

        mapping.SetHandle(address);
        mapping.Initialize((ulong)size);
        Interlocked.Add(ref s_mappedBytes, size);
        Interlocked.Increment(ref s_liveMappings);
        return mapping;
    }

    protected override bool ReleaseHandle()
    {
        long size = (long)ByteLength;
        int result = LinuxNative.Munmap(handle, (nuint)size);
        Debug.Assert(result == 0, $"munmap of {size} bytes failed with errno {Marshal.GetLastPInvokeError()}");
        long bytes = Interlocked.Add(ref s_mappedBytes, -size);
        long live = Interlocked.Decrement(ref s_liveMappings);
        Debug.Assert(bytes >= 0 && live >= 0, "a mapping was counted out more often than in");
        return result == 0;
    }

    protected override void Dispose(bool disposing)
    {
        // Finalizing a handle whose count already reached zero means a holder released one reference
        // too many in place of the owner's Dispose (SharedMemorySegment reports it to the owner). The
        // memory is unmapped; the base would throw ObjectDisposedException on the finalizer thread.
        if (!disposing && IsClosed)
        {
            return;
        }

        base.Dispose(disposing);
    }
}
