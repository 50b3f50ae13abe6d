using System.Diagnostics;

namespace OffloadRpc.Transport;

internal sealed partial class RpcConnection
{
    // ------------------------------------------------------------------ leases and releases

    /// <summary>Rents a lease of exactly <paramref name="length"/> bytes from this side's arena.</summary>
    public SharedBuffer Rent(int length, CancellationToken cancellationToken = default)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        ThrowIfClosed();
        ArenaBlock block = _arena.Allocate(length, cancellationToken);
        return new SharedBuffer(this, block.Segment, block.Offset, length, ownedBySender: true);
    }

    void ILeaseHost.ReturnLease(SharedBuffer lease) => ReleaseReceivedBlock(lease.Segment, lease.BlockOffset, lease.IsOwnArena);

    /// <summary>Gives a block back: to our arena when it is ours, else to the peer through the release ring.</summary>
    internal void ReleaseReceivedBlock(SharedMemorySegment segment, long offset, bool ownArena)
    {
        if (ownArena)
        {
            _arena.FreeLocal(segment.Id, offset);
            return;
        }

        if (IsClosed)
        {
            return; // the peer is gone; its memory goes with the mapping
        }

        PostRelease(PayloadArena.MakeHandle(segment.Id, offset));
    }

    private unsafe void PostRelease(ulong handle)
    {
        if (!_outbound.Segment.TryAddReference())
        {
            return;
        }

        try
        {
            ControlRing ring = _outbound.Releases;
            byte* slot = ring.TryReserve(out long position);
            if (slot is null)
            {
                if (Interlocked.Increment(ref _overflowCount) > _options.MaxPendingReleases)
                {
                    // The peer has stopped draining its release ring: we will not queue without bound for it.
                    Interlocked.Decrement(ref _overflowCount);
                    Terminate(Violation($"no room in its release ring for {_options.MaxPendingReleases} releases: it stopped taking its blocks back"));
                    return;
                }

                _overflowReleases.Enqueue(handle); // the receiver posts it once the ring drains
                SharedWait.Wake(_outbound.ConsumerWake);
                return;
            }

            *(ulong*)(slot + 8) = handle;
            ring.Publish(position);
            SharedWait.Wake(_outbound.ReleaseConsumerWake); // an allocator waiting for space
            if (!ring.IsFree(position + ring.Capacity / 2))
            {
                SharedWait.Wake(_outbound.ConsumerWake); // half full: have the owner's receiver drain it
            }
        }
        catch (ProtocolViolationException ex)
        {
            Terminate(ex);
        }
        finally
        {
            _outbound.Segment.Release();
        }
    }

    /// <summary>Posts releases that found the ring full (the receiver only).</summary>
    private unsafe void FlushOverflowReleases()
    {
        Debug.Assert(Poller.IsPollerThread, "overflow releases are posted by the receiver (a poller) only");
        while (_overflowReleases.TryPeek(out ulong handle))
        {
            byte* slot = _outbound.Releases.TryReserve(out long position);
            if (slot is null)
            {
                break;
            }

            _overflowReleases.TryDequeue(out _);
            Interlocked.Decrement(ref _overflowCount);
            *(ulong*)(slot + 8) = handle;
            _outbound.Releases.Publish(position);
        }

        SharedWait.Wake(_outbound.ReleaseConsumerWake);
        SharedWait.Wake(_outbound.ConsumerWake);
    }

    /// <summary>
    /// Waits until the peer posts a release or this process frees arena space (generation moves),
    /// holding a reference on the inbound area so the wake word cannot be unmapped under the wait.
    /// </summary>
    unsafe void IArenaPeer.WaitForSpace(PayloadArena arena, long freeGeneration, long deadline, CancellationToken cancellationToken)
    {
        if (!_inbound.Segment.TryAddReference())
        {
            throw ClosedException();
        }

        try
        {
            var condition = new SpaceReleased(this, arena, freeGeneration, deadline, cancellationToken);
            SharedWait.Wait(ref condition, _inbound.ReleaseConsumerWake, _arenaSpin, singleWaiter: false, _options.SleepSliceMilliseconds);
        }
        finally
        {
            _inbound.Segment.Release();
        }
    }

    /// <summary>Wakes this process's threads waiting for arena space (after a local free).</summary>
    unsafe void IArenaPeer.WakeSpaceWaiters()
    {
        if (_inbound.Segment.TryAddReference())
        {
            SharedWait.Wake(_inbound.ReleaseConsumerWake);
            _inbound.Segment.Release();
        }
    }

    private readonly struct SpaceReleased(RpcConnection connection, PayloadArena arena, long generation, long deadline, CancellationToken cancellationToken) : IWaitCondition
    {
        public bool IsSatisfied() => arena.FreeGeneration != generation || connection._inbound.Releases.HasMessage();

        public bool IsAbandoned() => connection.IsClosed || cancellationToken.IsCancellationRequested || Stopwatch.GetTimestamp() > deadline;
    }

    void IArenaPeer.DrainReleases(PayloadArena arena) => DrainReleases(arena);

    private unsafe void DrainReleases(PayloadArena arena)
    {
        ControlRing ring = _inbound.Releases;
        try
        {
            byte* slot;
            while ((slot = ring.TryPeek()) is not null)
            {
                ulong handle = Volatile.Read(ref *(ulong*)(slot + 8));
                ring.Consume();
                arena.ReleaseFromPeerLocked(handle);
            }
        }
        catch (ProtocolViolationException ex)
        {
            Terminate(ex);
            throw;
        }

        SharedWait.Wake(_inbound.ReleaseProducerWake);
    }
}
