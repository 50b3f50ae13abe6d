using System.Diagnostics;

namespace OffloadRpc.Transport;

internal sealed partial class RpcConnection
{

    /// <summary>Where the items of a stream that ended on this side land to be given back at once (the poller's only).</summary>
    private StreamItemMessage? _discardedItem;

    /// <summary>The most messages one poll consumes before the poller turns to its other connections.</summary>
    private const int MessagesPerPoll = 64;


    /// <summary>
    /// Consumes what the inbound rings hold (a bounded batch) and the connection's housekeeping
    /// (releases from the peer, releases and cancels that found our rings full). Runs on the poller.
    /// </summary>
    internal unsafe PollResult PollInbound(long now)
    {
        Debug.Assert(Poller.IsPollerThread, "a connection's inbound side is polled by a poller");
        if (IsClosed)
        {
            return FinishClosed();
        }

        bool worked = false;
        try
        {
            ControlRing ring = _inbound.Messages;
            int processed = 0;
            byte* slot;
            while (processed < MessagesPerPoll && (slot = ring.TryPeek()) is not null)
            {
                ProcessMessage(slot);
                processed++;
            }

            if (processed > 0)
            {
                _spin.OnArrival(now);
                worked = true;
            }

            if (_inbound.Releases.HasMessage())
            {
                _arena.DrainUnderLock(_drainReleases);
                worked = true;
            }

            if (!_overflowReleases.IsEmpty && _outbound.Releases.HasFreeSlot())
            {
                FlushOverflowReleases();
                worked = true;
            }

            if (!_pendingCancels.IsEmpty)
            {
                FlushPendingCancels();
            }
        }
        catch (ProtocolViolationException ex)
        {
            Terminate(ex);
            return PollResult.Finished;
        }
        catch (Exception ex)
        {
            Terminate(IsClosed ? ex : new OffloadRpcException("The receiver failed: " + ex.Message, ex));
            return PollResult.Finished;
        }

        return IsClosed ? FinishClosed() : worked ? PollResult.Worked : PollResult.Idle;
    }

    /// <summary>
    /// The receiver's last poll. When the peer closed the connection (the socket loop read end of stream),
    /// the answers it published before closing are still taken: a server that answers a call and then
    /// closes (a stop that waited for its calls, a dispose after a reply) must not lose the reply to the
    /// race between this side's socket loop, which sees the end of stream, and this receiver, which had not
    /// yet read the ring. Only responses and faults are taken, up to the first message of another kind;
    /// requests and stream messages of a peer that is gone are left, and whatever is left fails with the close.
    /// </summary>
    private unsafe PollResult FinishClosed()
    {
        if (Volatile.Read(ref _terminal) is not PeerDisconnectedException)
        {
            return PollResult.Finished;
        }

        try
        {
            ControlRing ring = _inbound.Messages;
            byte* slot;
            for (int taken = 0; taken < Geometry.SlotCount && (slot = ring.TryPeek()) is not null; taken++) // at most one answer per call
            {
                if (!ProcessMessage(slot, answersOnly: true)) // a call answered twice or not waiting throws: the rest fail with the close
                {
                    break;
                }
            }
        }
        catch (Exception ex) when (ex is not OutOfMemoryException)
        {
        }

        return PollResult.Finished;
    }

    /// <summary>The connection's inbound side as the poller sees it.</summary>
    private sealed unsafe class InboundSource : PollSource
    {
        private readonly RpcConnection _connection;

        public InboundSource(RpcConnection connection) => _connection = connection;

        /// <summary>
        /// Releases that found the peer's release ring full wait for it to drain, which the peer does not
        /// signal on our word: re-check them every millisecond (rare: the ring has thousands of entries).
        /// </summary>
        public override int SleepSliceMilliseconds => _connection._overflowReleases.IsEmpty ? _connection._options.SleepSliceMilliseconds : 1;

        public override PollResult Poll(long now) => _connection.PollInbound(now);

        public override void Arm(out int* word, out int expected)
        {
            word = _connection._inbound.ConsumerWake;
            expected = 1;
            Interlocked.Exchange(ref *word, 1);
        }

        public override void Disarm() => Volatile.Write(ref *_connection._inbound.ConsumerWake, 0);

        /// <summary>
        /// Replies are spun for only while the server grants it (it lets no more clients spin than it has
        /// cores); requests while the peer calls actively.
        /// </summary>
        public override long SpinUntil(long now) =>
            Volatile.Read(ref *_connection._inbound.SpinGrant) != 0
                ? _connection._spin.SpinUntil(now, _connection._calls.FastCallsInFlight, _connection._calls.CallsInFlight)
                : _connection._spin.SpinUntil(now, 0, 0);

        public override void OnWoken(long sleptTicks) => _connection._spin.OnWoken(sleptTicks);

        public override bool CompetesForSpin(long now) => _connection._handler is not null && _connection._spin.IsPeerActive(now);

        /// <summary>Served calls streaming their results: their producers run on the thread pool and need a core to make the next item.</summary>
        public override bool HasWorkElsewhere => Volatile.Read(ref _connection.StreamsBeingProduced) > 0;

        public override void GrantSpin(bool granted)
        {
            int value = granted ? 1 : 0;
            if (Volatile.Read(ref *_connection._outbound.SpinGrant) != value)
            {
                Volatile.Write(ref *_connection._outbound.SpinGrant, value);
            }
        }

        /// <summary>The poller has dropped the connection: it never reads the inbound area again.</summary>
        public override void OnRemoved() => _connection.PartStopped();
    }

    /// <summary>
    /// Reads one published slot: header once into a local, every field validated before use. With
    /// <paramref name="answersOnly"/> (a connection the peer closed) only a response or fault is taken: false
    /// leaves any other message, judged on the local copy, so a peer rewriting the slot cannot slip one past.
    /// </summary>
    private unsafe bool ProcessMessage(byte* slot, bool answersOnly = false)
    {
        MessageHeader header = *(MessageHeader*)slot;
        if (answersOnly && header.Kind is not (MessageKind.Response or MessageKind.Fault))
        {
            return false;
        }

        int count = header.PayloadCount;
        bool bodyInPayload = (header.Flags & MessageFlags.BodyInPayload) != 0;
        if (count > TransportProtocol.MaxPayloadsPerMessage)
        {
            throw Violation($"a message with {count} payload references (limit {TransportProtocol.MaxPayloadsPerMessage})");
        }

        if ((header.Flags & ~(MessageFlags.BodyInPayload | MessageFlags.HasMetadata)) != 0 || header.Reserved != 0
            || ((header.Flags & MessageFlags.HasMetadata) != 0 && header.Kind != MessageKind.Request))
        {
            throw Violation($"unknown message flags 0x{(int)header.Flags:x}");
        }

        if (header.BodyLength < 0 || MessageHeader.Size + (long)count * PayloadRef.Size + header.BodyLength > Geometry.SlotSize)
        {
            throw Violation($"a body of {header.BodyLength} bytes with {count} payloads in a {Geometry.SlotSize}-byte slot");
        }

        if (bodyInPayload && (count == 0 || header.BodyLength != 0))
        {
            throw Violation("a body-in-arena message without its body reference");
        }

        Span<PayloadRef> refs = stackalloc PayloadRef[TransportProtocol.MaxPayloadsPerMessage];
        new ReadOnlySpan<PayloadRef>(slot + MessageHeader.Size, count).CopyTo(refs);

        InboundMessage target;
        switch (header.Kind)
        {
            case MessageKind.Request:
                if (_handler is null)
                {
                    throw Violation("a request on a connection that serves none");
                }

                if ((header.CallId & ((1UL << PendingCall.IndexBits) - 1)) >= (ulong)_servedCalls.Length)
                {
                    throw Violation($"request id {header.CallId} outside the call table");
                }

                if (Volatile.Read(ref _servedCalls[header.CallId & ((1UL << PendingCall.IndexBits) - 1)]) is not null)
                {
                    throw Violation($"request id {header.CallId} while a call with its index is still being served");
                }

                IncomingCall call = RentIncomingCall();
                call.Begin(header.CallId);
                target = call;
                break;

            case MessageKind.Response:
            case MessageKind.Fault:
                PendingCall? entry = _calls.Find(header.CallId);
                if (entry is null || !entry.TryClaimResponse(header.CallId))
                {
                    throw Violation($"a response to call {header.CallId}, which is not waiting for one");
                }

                target = entry;
                break;

            case MessageKind.Cancel:
                if (count != 0 || header.BodyLength != 0)
                {
                    throw Violation("a cancel message with a body");
                }

                _inbound.Messages.Consume();
                SharedWait.Wake(_inbound.MessageProducerWake);
                CancelServedCall(header.CallId);
                return true;

            case MessageKind.StreamItem:
                if (FindInbox(header.CallId) is { } inbox)
                {
                    if (!inbox.AdmitItem())
                    {
                        throw Violation($"more items of stream {header.CallId} than its consumer granted credit for (window {inbox.Window})");
                    }

                    target = inbox.RentItem();
                }
                else if (_handler is not null)
                {
                    // A streamed argument's items may still come after the method returned (it need not read
                    // them all): they are given back as they arrive, so they hold no memory.
                    target = _discardedItem ??= new StreamItemMessage(this, null);
                }
                else
                {
                    throw Violation($"a stream item for call {header.CallId}, which streams nothing to it");
                }

                break;

            case MessageKind.StreamCredit:
            case MessageKind.StreamEnd:
                if (count != 0 || header.BodyLength != 0)
                {
                    throw Violation($"a {header.Kind} message with a body");
                }

                _inbound.Messages.Consume();
                SharedWait.Wake(_inbound.MessageProducerWake);
                if (header.Kind == MessageKind.StreamCredit)
                {
                    GrantStreamCredit(header.CallId, header.MethodId);
                }
                else
                {
                    FindInbox(header.CallId)?.Complete(null, discardQueued: false);
                }

                return true;

            case MessageKind.StreamFault:
                if (count != 0)
                {
                    throw Violation("a stream fault with payloads");
                }

                RemoteInvocationException streamFault = FaultCodec.Decode(new ReadOnlySpan<byte>(slot + MessageHeader.Size, header.BodyLength));
                _inbound.Messages.Consume();
                SharedWait.Wake(_inbound.MessageProducerWake);
                FindInbox(header.CallId)?.Complete(streamFault, discardQueued: false);
                return true;

            default:
                throw Violation($"message kind {(int)header.Kind}");
        }

        // From here on the target is claimed (a caller waits on it): whatever fails, it completes.
        try
        {
            Span<byte> body = target.PrepareBody(header.MethodId, header.BodyLength);
            new ReadOnlySpan<byte>(slot + MessageHeader.Size + count * PayloadRef.Size, header.BodyLength).CopyTo(body);
            _inbound.Messages.Consume();
            SharedWait.Wake(_inbound.MessageProducerWake);
            for (int i = 0; i < count; i++)
            {
                ReceivedPayload payload = Resolve(refs[i]);
                if (i == 0 && bodyInPayload)
                {
                    if (payload.Pipelined)
                    {
                        target.AddPayload(payload); // released with the message
                        throw Violation("a message body that is still being written");
                    }

                    TakeBodyFromArena(target, header.MethodId, payload);
                }
                else
                {
                    target.AddPayload(payload);
                }
            }

            if ((header.Flags & MessageFlags.HasMetadata) != 0 && !target.SplitMetadata())
            {
                throw Violation($"a metadata block longer than its {target.Body.Length}-byte body");
            }
        }
        catch (Exception ex)
        {
            Terminate(ex as ProtocolViolationException ?? new OffloadRpcException("The receiver failed: " + ex.Message, ex));
            target.ReleaseUntakenPayloads();
            if (target is PendingCall claimed)
            {
                claimed.CompleteWithException(ClosedException());
            }
            else if (target is StreamItemMessage item)
            {
                item.Release();
            }

            throw;
        }

        switch (header.Kind)
        {
            case MessageKind.Request:
                Dispatch((IncomingCall)target);
                break;
            case MessageKind.StreamItem:
                var streamItem = (StreamItemMessage)target;
                if (streamItem.Inbox is { } owner)
                {
                    owner.Deliver(streamItem);
                }
                else
                {
                    streamItem.Release();
                }

                break;
            case MessageKind.Response:
                ((PendingCall)target).CompleteWithResponse();
                break;
            default:
                var pending = (PendingCall)target;
                RemoteInvocationException fault;
                try
                {
                    fault = FaultCodec.Decode(pending.Body);
                }
                catch (Exception ex)
                {
                    Terminate(ex as ProtocolViolationException ?? new OffloadRpcException("The receiver failed: " + ex.Message, ex));
                    pending.CompleteWithException(ClosedException());
                    throw;
                }

                pending.CompleteWithException(fault);
                break;
        }

        return true;
    }

    private unsafe void TakeBodyFromArena(InboundMessage target, int methodId, ReceivedPayload payload)
    {
        try
        {
            if (payload.Length > _options.MaxMessageBytes)
            {
                throw Violation($"a message body of {payload.Length} bytes (limit {_options.MaxMessageBytes})");
            }

            Span<byte> body = target.PrepareBody(methodId, payload.Length);
            new ReadOnlySpan<byte>(payload.Segment.Pointer(payload.Offset, payload.Length), payload.Length).CopyTo(body);
        }
        finally
        {
            ReleaseReceivedBlock(payload.Segment, payload.BlockOffset, payload.OwnArena);
            payload.Segment.Release();
        }
    }

    /// <summary>Validates a payload reference and takes a mapping reference for it.</summary>
    private ReceivedPayload Resolve(in PayloadRef reference)
    {
        if (reference.Length < 0 || reference.Length > TransportProtocol.MaxPayloadLength)
        {
            throw Violation($"a payload of {reference.Length} bytes");
        }

        if ((reference.Offset & (PayloadArena.BlockAlignment - 1)) != 0 || reference.Offset < 0)
        {
            throw Violation($"a payload at unaligned offset {reference.Offset}");
        }

        if ((reference.Flags & ~(PayloadRef.ReceiverOwned | PayloadRef.Pipelined | PayloadRef.Streamed | PayloadRef.LengthAnnounced)) != 0
            || ((reference.Flags & PayloadRef.ReceiverOwned) != 0 && (reference.Flags & PayloadRef.Pipelined) != 0)
            || ((reference.Flags & PayloadRef.Streamed) != 0 && ((reference.Flags & PayloadRef.Pipelined) == 0 || reference.Length <= 0))
            || ((reference.Flags & PayloadRef.LengthAnnounced) != 0 && (reference.Flags & PayloadRef.Streamed) == 0))
        {
            throw Violation($"payload flags 0x{reference.Flags:x}{((reference.Flags & PayloadRef.Streamed) != 0 ? $" (a streamed payload's ring of {reference.Length} bytes)" : string.Empty)}");
        }

        if ((reference.Flags & PayloadRef.ReceiverOwned) != 0)
        {
            ArenaBlock block = _arena.ReturnFromPeer(reference.SegmentId, reference.Offset, reference.Length);
            return new ReceivedPayload { Segment = block.Segment, Offset = block.Offset, BlockOffset = block.Offset, Length = (int)reference.Length, OwnArena = true };
        }

        bool pipelined = (reference.Flags & PayloadRef.Pipelined) != 0;
        long header = pipelined ? PipelineHeader.Size : 0;

        int id = reference.SegmentId;
        SharedMemorySegment? segment = id > 0 && id <= PayloadArena.MaxSegments ? Volatile.Read(ref _peerSegments[id]) : null;
        if (segment is null)
        {
            throw Violation($"a payload in segment {id}, which it never handed over");
        }

        if (!segment.Contains(reference.Offset, header + reference.Length))
        {
            throw Violation($"a payload [{reference.Offset}, +{header + reference.Length}) outside its {segment.Size}-byte segment {id}");
        }

        // The reactor may retire the segment meanwhile (RemoveSegment disposes the connection's
        // reference): then this fails once nothing else holds the mapping either.
        if (!segment.TryAddReference())
        {
            throw Violation($"a payload in retired segment {id}");
        }

        return new ReceivedPayload { Segment = segment, Offset = reference.Offset + header, BlockOffset = reference.Offset, Length = (int)reference.Length, OwnArena = false, Pipelined = pipelined, Streamed = (reference.Flags & PayloadRef.Streamed) != 0, Announced = (reference.Flags & PayloadRef.LengthAnnounced) != 0 };
    }

    private ProtocolViolationException Violation(string what) =>
        new($"Protocol violation by peer process {Peer.ProcessId}: it sent {what}. The connection is closed.");

    // ------------------------------------------------------------------ serving requests

    /// <summary>
    /// A served call object for the next request. One spare sits in a slot of its own, so a handler that
    /// completes synchronously recycles its call without touching the shared pool (an exchange, safe
    /// whichever thread returns a call: a handler may finish on another thread, and a stuck poller's
    /// connections move to a new thread).
    /// </summary>
    private IncomingCall RentIncomingCall() =>
        Interlocked.Exchange(ref _spareIncomingCall, null)
        ?? (_incomingPool.TryDequeue(out IncomingCall? call) ? call : new IncomingCall(this));

    private void ReturnIncomingCall(IncomingCall call)
    {
        if (Interlocked.CompareExchange(ref _spareIncomingCall, call, null) is not null)
        {
            _incomingPool.Enqueue(call);
        }
    }

    /// <summary>
    /// A method whose synchronous part (until it returns or first awaits) usually takes longer than this
    /// runs on the thread pool even when inline dispatch is asked for: inline, it would hold up every
    /// connection of the poller, not only its own.
    /// </summary>
    private static readonly long InlineLimitTicks = Stopwatch.Frequency / 10_000; // 100 us

    /// <summary>Smoothed cost of each method class's synchronous part, in ticks (method id modulo the table size).</summary>
    private readonly long[] _handlerCost = new long[64];

    /// <summary>Requests dispatched whose handling (method and answer) has not finished: what a stopping server waits for.</summary>
    private int _callsBeingServed;

    /// <summary>Served calls that stream their results and have not been reset (their producers run off the poller).</summary>
    internal int StreamsBeingProduced;

    /// <summary>Called each time the requests being served drop to none (a stopping server looks again instead of polling).</summary>
    internal Action? ServedCallsDrained { get; set; }

    private void Dispatch(IncomingCall call)
    {
        Interlocked.Increment(ref _callsBeingServed);
        int index = (int)(call.CallId & ((1UL << PendingCall.IndexBits) - 1));
        Volatile.Write(ref _servedCalls[index], call);
        if (_options.DispatchToThreadPool || call.HasPipelinedPayload || Volatile.Read(ref _handlerCost[call.MethodId & (_handlerCost.Length - 1)]) > InlineLimitTicks)
        {
            // The poller goes straight back to the rings: calls overlap and cancels are seen while a
            // handler computes, at the price of a thread-pool hand-off per call. A call whose payload is
            // still landing always goes this way: taking it whole waits for its last chunk, which must
            // not hold up the poller's other connections (the hand-off is nothing next to a 2 MiB+ copy).
            ThreadPool.UnsafeQueueUserWorkItem(static state => state.Connection.Invoke(state), call, preferLocal: false);
            return;
        }

        Invoke(call);
    }

    private void Invoke(IncomingCall call)
    {
        ValueTask task;
        long started = Stopwatch.GetTimestamp();
        ref long cost = ref _handlerCost[call.MethodId & (_handlerCost.Length - 1)];
        try
        {
            task = _handler!.HandleAsync(call);
        }
        catch (Exception ex)
        {
            FinishCall(call, ex);
            return;
        }
        finally
        {
            // Measured wherever it runs, so a method that turned fast comes back inline. Racing updates may lose a sample: harmless.
            long estimate = Volatile.Read(ref cost);
            Volatile.Write(ref cost, estimate + ((Stopwatch.GetTimestamp() - started - estimate) / 4));
        }

        if (task.IsCompleted)
        {
            Exception? failure = null;
            try
            {
                task.GetAwaiter().GetResult();
            }
            catch (Exception ex)
            {
                failure = ex;
            }

            FinishCall(call, failure);
        }
        else
        {
            _ = ConnectionAsync.AwaitHandlerAsync(this, task, call);
        }
    }

    /// <summary>
    /// How many requests of the peer are being served now, until their answers are out (for a server that
    /// drains before it stops: a call's index is freed before its answer is sent, so the table alone would
    /// let the server close a connection while an answer is on its way).
    /// </summary>
    internal int ServedCallsInFlight => Volatile.Read(ref _callsBeingServed);

    /// <summary>Frees a served call's index in the table (idempotent): done before its answer goes out, which lets the caller reuse the index.</summary>
    internal void ReleaseServedIndex(IncomingCall call)
    {
        int index = (int)(call.CallId & ((1UL << PendingCall.IndexBits) - 1));
        Interlocked.CompareExchange(ref _servedCalls[index], null, call);
    }

    internal void FinishCall(IncomingCall call, Exception? failure)
    {
        ReleaseServedIndex(call); // for a call that returns without having answered: FinishCall answers it below
        try
        {
            if (failure is not null)
            {
                call.Fail(failure);
            }
            else if (!call.HasReplied)
            {
                call.Reply(default);
            }
        }
        catch (Exception ex) when (!IsClosed && ex is not OutOfMemoryException)
        {
            // The reply itself failed (too many payloads, a disposed lease, a full arena): answer with that.
            try
            {
                call.Fail(ex);
            }
            catch (Exception) when (IsClosed)
            {
            }
        }
        catch (Exception) when (IsClosed)
        {
            // The caller is gone; there is nobody to answer.
        }

        try
        {
            call.Reset();
            ReturnIncomingCall(call);
        }
        finally
        {
            if (Interlocked.Decrement(ref _callsBeingServed) == 0)
            {
                ServedCallsDrained?.Invoke();
            }
        }
    }

    /// <summary>
    /// The inbox a stream message names: a served call's streamed argument on a server, a call's streamed
    /// result on a client; null when the call is over or streams nothing here.
    /// </summary>
    private StreamInbox? FindInbox(ulong callId)
    {
        ulong index = callId & ((1UL << PendingCall.IndexBits) - 1);
        if (_handler is not null)
        {
            return index < (ulong)_servedCalls.Length ? Volatile.Read(ref _servedCalls[index])?.InboxFor(callId) : null;
        }

        return _calls.Find(callId)?.InboxFor(callId);
    }

    /// <summary>The consumer of a stream this side produces took <paramref name="items"/> more.</summary>
    private void GrantStreamCredit(ulong callId, int items)
    {
        if (items <= 0 || items > Geometry.SlotCount * 64)
        {
            throw Violation($"a credit of {items} items for stream {callId}");
        }

        ulong index = callId & ((1UL << PendingCall.IndexBits) - 1);
        StreamOutbox? outbox = _handler is not null
            ? (index < (ulong)_servedCalls.Length ? Volatile.Read(ref _servedCalls[index])?.OutboxFor(callId) : null)
            : _calls.Find(callId)?.OutboxFor(callId);
        if (outbox is not null && !outbox.Grant(items))
        {
            throw Violation($"more credit for stream {callId} than items it could ever take");
        }
    }

    private void CancelServedCall(ulong callId)
    {
        ulong index = callId & ((1UL << PendingCall.IndexBits) - 1);
        if (index >= (ulong)_servedCalls.Length)
        {
            throw Violation($"a cancel for call id {callId} outside the call table");
        }

        Volatile.Read(ref _servedCalls[index])?.Cancel(callId);
    }
}
