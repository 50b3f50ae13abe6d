namespace OffloadRpc.Transport;

/// <summary>
/// Leases on memory no other process maps: what a <see cref="SharedBuffer"/> is on a transport without
/// shared memory (gRPC). Each lease owns a small memfd mapping of its own (rounded to a page), so a
/// lease behaves exactly as one from an arena (Span, Memory, pins, Dispose), while its bytes are copied
/// into and out of messages by the transport.
/// </summary>
internal sealed class LocalLeases : ILeaseHost
{
    public static readonly LocalLeases Instance = new();

    private int _nextId;

    private LocalLeases()
    {
    }

    /// <summary>A lease of exactly <paramref name="bytes"/> bytes (zero allowed), zero-filled.</summary>
    public SharedBuffer Rent(int bytes)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(bytes);
        long size = Math.Max(4096, (bytes + 4095L) & ~4095L);
        SharedMemorySegment segment = SharedMemorySegment.Create(Interlocked.Increment(ref _nextId), size, "offloadrpc-local", populate: false);
        segment.CloseDescriptor(); // never passed to anybody
        if (!segment.TryAddReference())
        {
            segment.Dispose();
            throw new ObjectDisposedException(nameof(SharedMemorySegment));
        }

        return new SharedBuffer(this, segment, 0, bytes, ownedBySender: true);
    }

    /// <summary>The lease's own mapping goes with it (the lease then drops the reference it held; the last one unmaps).</summary>
    public void ReturnLease(SharedBuffer lease) => lease.Segment.Dispose();
}
