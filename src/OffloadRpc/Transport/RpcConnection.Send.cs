using System.Diagnostics;

namespace OffloadRpc.Transport;

/// <summary>The sending half of a connection: calls, cancels, and every message through <see cref="OutboundMessage"/>.</summary>
internal sealed partial class RpcConnection
{
    /// <summary>The most items of a stream this side consumes that may be in flight.</summary>
    internal int StreamWindow => _options.StreamWindow;

    /// <summary>Whether awaiters of this side's calls (and of its streamed results) resume on the thread pool rather than inline on the poller.</summary>
    internal bool RunContinuationsAsynchronously => _options.RunContinuationsAsynchronously;

    /// <summary>How many bytes a pipelined payload writes between two progress updates.</summary>
    internal long PipelineChunkBytes => _options.PipelineChunkBytes;

    // ------------------------------------------------------------------ calls (client side)

    /// <summary>
    /// Sends a request and returns its reply. The body and payload bytes are copied into shared memory
    /// before this returns, so the caller may reuse its buffers at once; leases passed with
    /// <see cref="OutboundPayload.Move"/> belong to the peer afterwards.
    /// </summary>
    public ValueTask<RpcReply> CallAsync(int methodId, ReadOnlySpan<byte> body, ReadOnlySpan<OutboundPayload> payloads, CancellationToken cancellationToken = default) =>
        CallAsync(methodId, body, payloads, MessageFlags.None, null, null, cancellationToken);

    /// <summary>As above, with message flags (<see cref="MessageFlags.HasMetadata"/>: the body starts with a metadata block).</summary>
    public ValueTask<RpcReply> CallAsync(int methodId, ReadOnlySpan<byte> body, ReadOnlySpan<OutboundPayload> payloads, MessageFlags flags, CancellationToken cancellationToken) =>
        CallAsync(methodId, body, payloads, flags, null, null, cancellationToken);

    /// <summary>
    /// As above, with message flags (<see cref="MessageFlags.HasMetadata"/>: the body starts with a metadata block);
    /// with an <paramref name="inbox"/> the call's result is a stream: its items go there as they arrive, and the reply ends it;
    /// with an <paramref name="outbox"/> the call has a streamed argument, whose items go out under the server's credit.
    /// </summary>
    public ValueTask<RpcReply> CallAsync(int methodId, ReadOnlySpan<byte> body, ReadOnlySpan<OutboundPayload> payloads, MessageFlags flags, StreamInbox? inbox, StreamOutbox? outbox, CancellationToken cancellationToken)
    {
        if (cancellationToken.IsCancellationRequested)
        {
            DisposeLeases(payloads);
            return ValueTask.FromCanceled<RpcReply>(cancellationToken);
        }

        if (IsClosed)
        {
            DisposeLeases(payloads);
            return ValueTask.FromException<RpcReply>(ClosedException());
        }

        PendingCall? call = _calls.TryClaim();
        if (call is null)
        {
            // Slow path (every entry in flight): keep the promise that the caller's buffers are free
            // on return by copying their bytes now; leases move as they are.
            var owned = new OutboundPayload[payloads.Length];
            for (int i = 0; i < owned.Length; i++)
            {
                owned[i] = payloads[i].Lease is null && payloads[i].Stream is null ? OutboundPayload.Copy(payloads[i].Data.ToArray(), payloads[i].Mode, payloads[i].Cache) : payloads[i];
            }

            return CallWhenEntryFreeAsync(methodId, body.ToArray(), owned, flags, inbox, outbox, cancellationToken);
        }

        return StartCall(call, methodId, body, payloads, flags, inbox, outbox, cancellationToken);
    }

    private ValueTask<RpcReply> CallWhenEntryFreeAsync(int methodId, byte[] body, OutboundPayload[] payloads, MessageFlags flags, StreamInbox? inbox, StreamOutbox? outbox, CancellationToken cancellationToken) =>
        ConnectionAsync.CallWhenEntryFreeAsync(this, _calls, methodId, body, payloads, flags, inbox, outbox, cancellationToken);

    internal ValueTask<RpcReply> StartCallAfterWait(PendingCall call, int methodId, byte[] body, OutboundPayload[] payloads, MessageFlags flags, StreamInbox? inbox, StreamOutbox? outbox, CancellationToken cancellationToken) =>
        StartCall(call, methodId, body, payloads, flags, inbox, outbox, cancellationToken);

    private ValueTask<RpcReply> StartCall(PendingCall call, int methodId, ReadOnlySpan<byte> body, ReadOnlySpan<OutboundPayload> payloads, MessageFlags flags, StreamInbox? inbox, StreamOutbox? outbox, CancellationToken cancellationToken)
    {
        if (inbox is not null)
        {
            call.Inbox = inbox; // before the request is out: its first item may come at once
            inbox.Attach(call.CallId);
        }

        if (outbox is not null)
        {
            call.Outbox = outbox; // before the request is out: the server's credit may come at once
            outbox.Attach(this, call.CallId);
        }

        long now = Stopwatch.GetTimestamp();
        call.BeginFlight(methodId, now);
        _spin.OnSend(now);
        try
        {
            if (inbox is null && outbox is null && TrySendOffloaded(call, methodId, body, payloads, flags, cancellationToken))
            {
                return new ValueTask<RpcReply>(call, call.Version); // published (and cancellation armed) once the copy is done
            }

            Send(MessageKind.Request, call.CallId, methodId, body, payloads, cancellationToken, flags);
        }
        catch (Exception ex)
        {
            call.AbortBeforeSend();
            DisposeLeases(payloads); // a lease passed to a call is the call's, sent or not
            return ValueTask.FromException<RpcReply>(ex);
        }

        // The request is out. If the connection closed meanwhile, the receiver's sweep may have
        // run before our entry was in flight: fail it here (FailOnClose is idempotent).
        Interlocked.MemoryBarrier();
        if (IsClosed)
        {
            call.FailOnClose(ClosedException());
        }
        else
        {
            inbox?.GrantInitialCredit(); // after the request: the server learns of the call first
            call.RegisterCancellation(cancellationToken);
        }

        return new ValueTask<RpcReply>(call, call.Version);
    }

    /// <summary>Gives back the leases of a call that will not be sent (Dispose is a no-op on a lease already gone).</summary>
    private static void DisposeLeases(ReadOnlySpan<OutboundPayload> payloads)
    {
        foreach (OutboundPayload payload in payloads)
        {
            try
            {
                payload.Lease?.Dispose();
            }
            catch (Exception ex) when (ex is OffloadRpcException or ObjectDisposedException)
            {
            }
        }
    }

    /// <summary>
    /// Tells the server a call was cancelled. Never blocks the cancelling thread (it may be a timer or
    /// the receiver): when the ring is full the cancel waits in a queue flushed by later sends
    /// and by the receiver.
    /// </summary>
    internal void TrySendCancel(ulong callId) => TrySendControl(MessageKind.Cancel, callId, 0);

    /// <summary>
    /// Sends a message without body or payloads (a cancel, a stream's credit or end) in order with the
    /// others of its kind, without ever blocking: when the ring is full it waits in a queue flushed by
    /// later sends and by the receiver. Safe on the poller.
    /// </summary>
    internal void TrySendControl(MessageKind kind, ulong callId, int value)
    {
        _pendingCancels.Enqueue(new ControlMessage(kind, callId, value));
        FlushPendingCancels();
    }

    /// <summary>A queued message without body: kind, call, and the value it carries in the method-id field.</summary>
    private readonly record struct ControlMessage(MessageKind Kind, ulong CallId, int Value);

    private unsafe void FlushPendingCancels()
    {
        if (IsClosed || !_outbound.Segment.TryAddReference())
        {
            return;
        }

        try
        {
            // One flusher at a time: two threads that peeked the same cancel would publish one twice and
            // lose the next. A flusher that finds the lock taken leaves the queue to the one inside, which
            // looks again after it lets go (a cancel queued meanwhile is not left behind).
            while (!_pendingCancels.IsEmpty && Monitor.TryEnter(_cancelFlushLock))
            {
                try
                {
                    while (_pendingCancels.TryPeek(out ControlMessage control))
                    {
                        byte* slot = _outbound.Messages.TryReserve(out long position);
                        if (slot is null)
                        {
                            return; // the ring is full: the next send or the receiver's next poll flushes
                        }

                        bool dequeued = _pendingCancels.TryDequeue(out ControlMessage taken);
                        Debug.Assert(dequeued && taken == control, "only the lock holder dequeues cancels");
                        WriteAndPublish(slot, position, control.Kind, control.CallId, control.Value, MessageFlags.None, [], []);
                    }
                }
                finally
                {
                    Monitor.Exit(_cancelFlushLock);
                }
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

    // ------------------------------------------------------------------ sending

    /// <summary>
    /// Sends one message (request, response or fault): payload bytes into the arena, leases detached,
    /// then a ring slot reserved, filled and published, all through one <see cref="OutboundMessage"/>.
    /// Nothing is lost on failure: blocks are freed and leases restored.
    /// </summary>
    internal void Send(MessageKind kind, ulong callId, int methodId, ReadOnlySpan<byte> body, ReadOnlySpan<OutboundPayload> payloads, CancellationToken cancellationToken, MessageFlags flags = MessageFlags.None)
    {
        bool bodyInArena = MessageHeader.Size + (long)payloads.Length * PayloadRef.Size + body.Length > Geometry.SlotSize;
        ThrowIfTooManyPayloads(payloads.Length + (bodyInArena ? 1 : 0), nameof(payloads));
        if (!_pendingCancels.IsEmpty)
        {
            FlushPendingCancels();
        }

        OutboundMessage message = OutboundMessage.Begin(this, kind, callId, methodId, flags);
        try
        {
            message.AddBody(body, bodyInArena, keepInlineCopy: false, cancellationToken);
            foreach (ref readonly OutboundPayload payload in payloads)
            {
                message.Add(payload, allowAsync: false, cancellationToken);
            }
        }
        catch
        {
            message.Abandon(disposeLeases: false);
            throw;
        }

        message.Commit(bodyInArena ? default : body, cancellationToken);
    }

    private void ThrowIfTooManyPayloads(int references, string parameter)
    {
        if (references > TransportProtocol.MaxPayloadsPerMessage || MessageHeader.Size + references * PayloadRef.Size > Geometry.SlotSize)
        {
            throw new ArgumentException($"A message carries at most {TransportProtocol.MaxPayloadsPerMessage} payloads (its body counts as one when it exceeds the slot).", parameter);
        }
    }

    /// <summary>
    /// Offload mode with the caller's thread free: the payload bytes are handed to the copy workers and
    /// the call returns at once; the request is published from the thread pool once they are done.
    /// Many calls in flight so overlap the copy of one with the service of another. The caller's buffer
    /// must stay unchanged until the call's task completes, as with any asynchronous write. Taken only
    /// for requests with an inline body, no pipelined payload, and at least one payload the caller
    /// explicitly offloaded from an array (Auto keeps the promise that the caller's buffer is free when
    /// the call returns); anything else goes through <see cref="Send"/>, which offloads synchronously.
    /// </summary>
    private bool TrySendOffloaded(PendingCall call, int methodId, ReadOnlySpan<byte> body, ReadOnlySpan<OutboundPayload> payloads, MessageFlags flags, CancellationToken cancellationToken)
    {
        if (!HasAsyncOffload(body.Length, payloads))
        {
            return false;
        }

        ThrowIfTooManyPayloads(payloads.Length, nameof(payloads));
        OutboundMessage message = OutboundMessage.Begin(this, MessageKind.Request, call.CallId, methodId, flags);
        try
        {
            message.AddBody(body, inArena: false, keepInlineCopy: true, cancellationToken);
            foreach (ref readonly OutboundPayload payload in payloads)
            {
                message.Add(payload, allowAsync: true, cancellationToken);
            }

            message.CommitWhenCopied(call, cancellationToken);
        }
        catch
        {
            message.Abandon(disposeLeases: false);
            throw;
        }

        return true;
    }

    /// <summary>Whether a request goes the asynchronous offload way (see <see cref="TrySendOffloaded"/>); allocation-free.</summary>
    private bool HasAsyncOffload(int bodyLength, ReadOnlySpan<OutboundPayload> payloads)
    {
        if (payloads.IsEmpty || MessageHeader.Size + (long)payloads.Length * PayloadRef.Size + bodyLength > Geometry.SlotSize)
        {
            return false; // nothing to offload, or a body that overflows the slot: the ordinary path
        }

        bool any = false;
        foreach (ref readonly OutboundPayload payload in payloads)
        {
            if (payload.Stream is not null)
            {
                return false; // read into its block after publishing: the synchronous path
            }

            if (payload.Lease is not null)
            {
                continue;
            }

            Engines.TransferPlan plan = Engines.TransferPolicy.Resolve(payload.Data.Length, payload.Mode, payload.Cache, _options.PipelineChunkBytes);
            if (plan.Mode == TransferMode.Pipelined)
            {
                return false; // a mix with pipelined payloads: the synchronous path orders them
            }

            any |= OutboundMessage.IsAsyncOffload(payload.Data, payload.Mode, payload.IsTransient, plan);
        }

        return any;
    }

    /// <summary>
    /// Test hook: holds this side's outbound area mapped, as an <see cref="OutboundMessage"/> does from
    /// Begin to recycling. A writer between <see cref="ReserveSlot"/> and publishing (which may wait for
    /// room) touches the ring and its wake words while a closing connection releases its resources on
    /// another thread; without the hold it would write to an unmapped page. Throws the connection's
    /// closed exception once the area is gone. Pair with <see cref="ExitOutbound"/>.
    /// </summary>
    internal void EnterOutbound()
    {
        if (!_outbound.Segment.TryAddReference())
        {
            throw ClosedException();
        }
    }

    /// <summary>Lets go of the hold <see cref="EnterOutbound"/> took; the last holder of a closed connection unmaps.</summary>
    internal void ExitOutbound() => _outbound.Segment.Release();

    /// <summary>
    /// Reserves the next outbound slot, waiting (bounded by close and cancellation) while the ring is full.
    /// The caller holds the outbound area until it has published the slot (an <see cref="OutboundMessage"/>
    /// from Begin to recycling; a test's raw writer with <see cref="EnterOutbound"/>).
    /// An answer (response or fault) never waits long: the peer can have no more answers outstanding than
    /// calls in flight, and no more calls in flight than the ring has slots, so a full ring at answer
    /// time means it stopped consuming. On the poller (which serves every connection) an answer waits
    /// only for the spin; elsewhere at most <see cref="TransportOptions.ArenaWaitTimeout"/>. Then the peer
    /// is disconnected with <see cref="ProtocolViolationException"/>.
    /// </summary>
    internal unsafe byte* ReserveSlot(out long position, MessageKind kind, CancellationToken cancellationToken)
    {
        bool answer = kind is MessageKind.Response or MessageKind.Fault;
        long deadline = !answer || _options.ArenaWaitTimeout == Timeout.InfiniteTimeSpan ? long.MaxValue
            : Stopwatch.GetTimestamp() + (long)(_options.ArenaWaitTimeout.TotalSeconds * Stopwatch.Frequency);
        // Stream items leave half the ring to answers: an answer must find room (see above), and a
        // stream's producer outruns its consumer's poller, which answers never do.
        long keepFree = kind == MessageKind.StreamItem ? _outbound.Messages.Capacity / 2 : 0;
        while (true)
        {
            ThrowIfClosed();
            byte* slot;
            try
            {
                position = 0;
                slot = keepFree == 0 || _outbound.Messages.HasRoomBeyond(keepFree) ? _outbound.Messages.TryReserve(out position) : null;
            }
            catch (ProtocolViolationException ex)
            {
                Terminate(ex);
                throw;
            }

            if (slot is not null)
            {
                return slot;
            }

            var condition = new RingHasSpace(this, _outbound.Messages, keepFree, deadline, cancellationToken);
            bool satisfied = answer && Poller.IsPollerThread
                ? SharedWait.Spin(ref condition, _sendSpin.BudgetTicks) == SharedWait.SpinOutcome.Satisfied
                : SharedWait.Wait(ref condition, _outbound.MessageProducerWake, _sendSpin, singleWaiter: false, _options.SleepSliceMilliseconds);
            cancellationToken.ThrowIfCancellationRequested();
            if (!satisfied && answer && !IsClosed)
            {
                var violation = Violation($"more requests than it consumed answers: its {Geometry.SlotCount}-slot answer ring stayed full");
                Terminate(violation);
                throw violation;
            }
        }
    }

    private readonly struct RingHasSpace(RpcConnection connection, ControlRing ring, long keepFree, long deadline, CancellationToken cancellationToken) : IWaitCondition
    {
        public bool IsSatisfied() => keepFree == 0 ? ring.HasFreeSlot() : ring.HasRoomBeyond(keepFree);

        public bool IsAbandoned() => connection.IsClosed || cancellationToken.IsCancellationRequested || Stopwatch.GetTimestamp() > deadline;
    }

    // ------------------------------------------------------------------ hooks for the protocol-violation tests

    /// <summary>This side's outbound control area (messages go into its ring; tests write raw, possibly corrupt, slots).</summary>
    internal ControlArea OutboundArea => _outbound;

    /// <summary>Test hook: the socket, to send raw frames.</summary>
    internal SocketChannel Channel => _channel;

    /// <summary>Test hook: this side stops consuming what the peer sends (a peer that never reads its answers), the connection stays open.</summary>
    internal void StopReceivingForTests() => _receiver.RequestRemoval();

    /// <summary>Test hook: holds the outbound area and reserves the next slot without writing it; the caller ends with <see cref="ExitOutbound"/>.</summary>
    internal unsafe byte* ReserveRawSlot(out long position)
    {
        EnterOutbound();
        try
        {
            return ReserveSlot(out position, MessageKind.Request, CancellationToken.None);
        }
        catch
        {
            ExitOutbound();
            throw;
        }
    }

    /// <summary>Test hook: wakes the peer's receiver without publishing anything (the caller holds the outbound area).</summary>
    internal unsafe void WakePeerConsumer() => SharedWait.WakeUnconditionally(_outbound.ConsumerWake);

    /// <summary>The one place a message is laid out in a reserved slot: header, payload references, inline body; then published and the receiver woken.</summary>
    internal unsafe void WriteAndPublish(byte* slot, long position, MessageKind kind, ulong callId, int methodId, MessageFlags flags, ReadOnlySpan<PayloadRef> refs, ReadOnlySpan<byte> body)
    {
        Debug.Assert(refs.Length <= TransportProtocol.MaxPayloadsPerMessage, "more payload references than a message carries");
        Debug.Assert(MessageHeader.Size + (refs.Length * PayloadRef.Size) + body.Length <= Geometry.SlotSize, "a message larger than its slot");
        Debug.Assert(((flags & MessageFlags.BodyInPayload) == 0) || (body.IsEmpty && refs.Length > 0), "a body-in-arena message carries its body as the first reference");
        MessageHeader* header = (MessageHeader*)slot;
        header->CallId = callId;
        header->Kind = kind;
        header->Flags = flags;
        header->MethodId = methodId;
        header->BodyLength = body.Length;
        header->PayloadCount = (ushort)refs.Length;
        header->Reserved = 0;
        refs.CopyTo(new Span<PayloadRef>(slot + MessageHeader.Size, refs.Length));
        body.CopyTo(new Span<byte>(slot + MessageHeader.Size + (refs.Length * PayloadRef.Size), body.Length));
        PublishRawSlot(position);
    }

    /// <summary>Publishes a reserved slot and wakes the peer (test hook: a slot written by hand).</summary>
    internal unsafe void PublishRawSlot(long position)
    {
        _outbound.Messages.Publish(position);
        SharedWait.Wake(_outbound.ConsumerWake);
    }
}
