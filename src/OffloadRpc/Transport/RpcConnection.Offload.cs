using System.Buffers;
using System.Runtime.InteropServices;
using OffloadRpc.Engines;

namespace OffloadRpc.Transport;

internal sealed unsafe partial class RpcConnection
{
    /// <summary>
    /// Offload mode with the caller's thread free: the payload bytes are handed to the copy workers and
    /// the call returns at once; the worker that finishes the last copy publishes the request. Many
    /// calls in flight so overlap the copy of one with the service of another. The caller's buffer must
    /// stay unchanged until the call's task completes, as with any asynchronous write.
    /// Taken only for requests whose offloaded payloads are array-backed (they can be pinned for the
    /// duration) and whose caller asked for Offload explicitly (Auto keeps the promise that the caller's
    /// buffer is free when the call returns); anything else goes through <see cref="Send"/>, which
    /// offloads synchronously.
    /// </summary>
    private bool TrySendOffloaded(PendingCall call, int methodId, ReadOnlySpan<byte> body, ReadOnlySpan<OutboundPayload> payloads, CancellationToken cancellationToken)
    {
        int offloaded = 0;
        foreach (OutboundPayload payload in payloads)
        {
            if (payload.Lease is not null)
            {
                continue;
            }

            TransferPlan plan = TransferPolicy.Resolve(payload.Data.Length, payload.Mode, payload.Cache, _options.PipelineChunkBytes);
            if (plan.Mode == TransferMode.Pipelined)
            {
                return false; // a mix with pipelined payloads: the synchronous path orders them
            }

            if (IsAsyncOffload(payload, plan))
            {
                offloaded++;
            }
        }

        int slotSize = Geometry.SlotSize;
        if (offloaded == 0 || MessageHeader.Size + (long)payloads.Length * PayloadRef.Size + body.Length > slotSize)
        {
            return false; // nothing to offload, or a body that overflows the slot: the ordinary path
        }

        if (payloads.Length > TransportProtocol.MaxPayloadsPerMessage || MessageHeader.Size + payloads.Length * PayloadRef.Size > slotSize)
        {
            throw new ArgumentException($"A message carries at most {TransportProtocol.MaxPayloadsPerMessage} payloads.", nameof(payloads));
        }

        if (!_outbound.Segment.TryAddReference())
        {
            throw ClosedException();
        }

        var send = new OffloadedSend(this, call, methodId, body.ToArray(), payloads.Length, cancellationToken);
        bool submitted = false;
        try
        {
            var descriptors = new CopyDescriptor[offloaded];
            int d = 0;
            for (int i = 0; i < payloads.Length; i++)
            {
                OutboundPayload payload = payloads[i];
                SharedBuffer? lease = payload.Lease;
                if (lease is not null && lease.Host == this && lease.CanMove)
                {
                    if (!lease.TryDetach())
                    {
                        throw new ObjectDisposedException(nameof(SharedBuffer), "A lease passed to a call was already disposed or passed on.");
                    }

                    send.Detached.Add(lease);
                    send.Refs[i] = new PayloadRef { SegmentId = lease.Segment.Id, Flags = lease.IsOwnArena ? 0 : PayloadRef.ReceiverOwned, Offset = lease.Offset, Length = lease.Length };
                    continue;
                }

                ReadOnlySpan<byte> data = lease is null ? payload.Data.Span : lease.Span;
                TransferPlan plan = TransferPolicy.Resolve(data.Length, payload.Mode, payload.Cache, _options.PipelineChunkBytes);
                ArenaBlock block = _arena.Allocate(data.Length, cancellationToken);
                send.Allocated.Add((block.Segment, block.Offset));
                byte* destination = block.Segment.Pointer(block.Offset, data.Length);
                send.Refs[i] = new PayloadRef { SegmentId = block.Segment.Id, Offset = block.Offset, Length = data.Length };
                if (lease is null && IsAsyncOffload(payload, plan))
                {
                    MemoryHandle pin = payload.Data.Pin();
                    send.Pins.Add(pin);
                    descriptors[d++] = CopyDescriptor.Create((nint)pin.Pointer, (nint)destination, (ulong)data.Length, plan.Cache);
                    TransferMetrics.Record(plan, data.Length);
                }
                else
                {
                    fixed (byte* source = data)
                    {
                        PayloadMover.Move(source, destination, data.Length, plan);
                    }

                    if (lease is not null)
                    {
                        send.Foreign.Add(lease); // copied from another connection: it goes back once the request is out
                    }
                }
            }

            // Publishing may wait for a ring slot: never on a copy worker (they serve every connection).
            send.Completion.OnCompleted(static s => ThreadPool.UnsafeQueueUserWorkItem(static o => o.Publish(), (OffloadedSend)s!, preferLocal: false), send);
            WorkerCopyEngine.Shared.Submit(descriptors.AsSpan(0, d), send.Completion);
            submitted = true;
            return true;
        }
        finally
        {
            if (!submitted)
            {
                send.Abandon(reattachLeases: true);
            }
        }
    }

    /// <summary>Only a payload the caller explicitly offloaded, from an array it owns (pinnable for the duration), goes asynchronously.</summary>
    private static bool IsAsyncOffload(in OutboundPayload payload, TransferPlan plan) =>
        payload.Mode == TransferMode.Offload && plan.Mode == TransferMode.Offload && !payload.IsTransient
        && payload.Data.Length >= CopyRoutines.NonTemporalThreshold && MemoryMarshal.TryGetArray(payload.Data, out ArraySegment<byte> _);

    /// <summary>A request whose payloads the copy workers are still writing; published from the thread pool once they are done.</summary>
    private sealed class OffloadedSend
    {
        private readonly RpcConnection _connection;
        private readonly PendingCall _call;
        private readonly int _methodId;
        private readonly byte[] _body;
        private readonly CancellationToken _cancellationToken;

        public OffloadedSend(RpcConnection connection, PendingCall call, int methodId, byte[] body, int payloadCount, CancellationToken cancellationToken)
        {
            _connection = connection;
            _call = call;
            _methodId = methodId;
            _body = body;
            _cancellationToken = cancellationToken;
            Refs = new PayloadRef[payloadCount];
        }

        public PayloadRef[] Refs { get; }

        public List<(SharedMemorySegment Segment, long Offset)> Allocated { get; } = new(2);

        public List<MemoryHandle> Pins { get; } = new(1);

        public List<SharedBuffer> Detached { get; } = new(1);

        public List<SharedBuffer> Foreign { get; } = new(1);

        public CopyCompletion Completion { get; } = new();

        /// <summary>Runs on the thread pool once the last byte is in place: reserve a slot, mark the blocks lent, publish.</summary>
        public void Publish()
        {
            ReleasePins();
            RpcConnection c = _connection;
            try
            {
                byte* slot = c.ReserveSlot(out long position, CancellationToken.None);
                foreach (PayloadRef reference in Refs)
                {
                    if ((reference.Flags & PayloadRef.ReceiverOwned) == 0)
                    {
                        c._arena.MarkLent(reference.SegmentId, reference.Offset);
                    }
                }

                c.WriteAndPublish(slot, position, MessageKind.Request, _call.CallId, _methodId, MessageFlags.None, Refs, _body);
            }
            catch (Exception ex)
            {
                // The caller has gone on: the call fails through its task, and nothing it handed over is lost.
                // Nothing may escape from here (a thread-pool item): every step is guarded.
                try
                {
                    Abandon(reattachLeases: true);
                    foreach (SharedBuffer lease in Detached)
                    {
                        try
                        {
                            lease.Dispose();
                        }
                        catch (Exception disposeFailure) when (disposeFailure is OffloadRpcException or ObjectDisposedException or InvalidOperationException)
                        {
                        }
                    }
                }
                catch (Exception cleanupFailure) when (cleanupFailure is OffloadRpcException or ObjectDisposedException or InvalidOperationException)
                {
                }

                _call.FailOnClose(ex is OffloadRpcException ? ex : new PeerDisconnectedException("The request could not be sent: " + ex.Message, ex));
                return;
            }

            // Armed only now: a cancel sent before the request would reach the server first and be ignored.
            _call.RegisterCancellation(_cancellationToken);

            foreach ((SharedMemorySegment segment, long _) in Allocated)
            {
                segment.Release();
            }

            foreach (SharedBuffer lease in Detached)
            {
                lease.ReleaseDetachedMapping();
            }

            DisposeForeign();
            c._outbound.Segment.Release();
        }

        /// <summary>The request will not be sent: free the blocks taken for it and undo the lease hand-over.</summary>
        public void Abandon(bool reattachLeases)
        {
            ReleasePins();
            foreach ((SharedMemorySegment segment, long offset) in Allocated)
            {
                _connection._arena.FreeLocal(segment.Id, offset);
                segment.Release();
            }

            Allocated.Clear();
            if (reattachLeases)
            {
                foreach (SharedBuffer lease in Detached)
                {
                    lease.Reattach();
                }
            }

            DisposeForeign();
            _connection._outbound.Segment.Release();
        }

        private void ReleasePins()
        {
            foreach (MemoryHandle pin in Pins)
            {
                pin.Dispose();
            }

            Pins.Clear();
        }

        private void DisposeForeign()
        {
            foreach (SharedBuffer lease in Foreign)
            {
                try
                {
                    lease.Dispose();
                }
                catch (Exception ex) when (ex is OffloadRpcException or ObjectDisposedException)
                {
                }
            }

            Foreign.Clear();
        }
    }
}
