using System.Buffers.Binary;
using System.Collections.Concurrent;
using System.Diagnostics;

namespace OffloadRpc.Transport;

/// <summary>
/// One end of a connection: the message-level API the generated proxies and stubs call.
/// <para>
/// Per direction there is a control area (message ring + release ring, created by the sender) and a
/// payload arena (segments created by the sender). Any number of threads send; one receive thread
/// per connection consumes the inbound ring, completes calls and runs request handlers; one socket
/// thread maps segments the peer hands over and notices the peer's death (end of stream).
/// </para>
/// </summary>
internal sealed unsafe partial class RpcConnection : IArenaPeer, ILeaseHost, IAsyncDisposable
{
    private readonly SocketChannel _channel;
    private readonly TransportOptions _options;

    /// <summary>How long a pipelined payload may make no progress before its sender counts as stuck.</summary>
    internal TimeSpan StallTimeout => _options.ArenaWaitTimeout;
    private readonly ControlArea _outbound;
    private readonly ControlArea _inbound;
    private readonly PayloadArena _arena;
    private readonly SharedMemorySegment?[] _peerSegments = new SharedMemorySegment?[PayloadArena.MaxSegments + 1];
    private readonly PendingCallTable _calls;
    private readonly IRequestHandler? _handler;
    private readonly IncomingCall?[] _servedCalls;
    private readonly ConcurrentQueue<IncomingCall> _incomingPool = new();
    private readonly ConcurrentQueue<ulong> _overflowReleases = new();
    private readonly ConcurrentQueue<ulong> _pendingCancels = new();
    private readonly AdaptiveSpin _receiveSpin;
    private readonly AdaptiveSpin _sendSpin;
    private readonly AdaptiveSpin _arenaSpin;
    private readonly Thread _receiveThread;
    private readonly Thread _socketThread;
    private readonly TaskCompletionSource _receiveExited = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly TaskCompletionSource _socketExited = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly object _announceLock = new();
    private readonly Action<PayloadArena> _drainReleases;
    private IncomingCall? _spareIncomingCall; // receive thread only
    private long _announcesSent;
    private long _announcesAcknowledged;
    private Exception? _terminal;
    private int _closed;
    private int _started;

    internal RpcConnection(SocketChannel channel, TransportOptions options, ControlArea outbound, ControlArea inbound, PeerInfo peer, IRequestHandler? handler, string role)
    {
        _channel = channel;
        _options = options;
        _outbound = outbound;
        _inbound = inbound;
        Peer = peer;
        _handler = handler;
        Role = role;
        Geometry = outbound.Geometry;
        _receiveSpin = new AdaptiveSpin(options.SpinBudget);
        _sendSpin = new AdaptiveSpin(options.SpinBudget);
        _arenaSpin = new AdaptiveSpin(options.SpinBudget);
        _arena = new PayloadArena(this, options.SegmentSize, options.MaxArenaBytes, options.ArenaWaitTimeout, $"{role}-{Environment.ProcessId}");
        _calls = new PendingCallTable(this, Geometry.SlotCount, options.RunContinuationsAsynchronously);
        _servedCalls = new IncomingCall?[Geometry.SlotCount];
        _drainReleases = DrainReleases;
        _receiveThread = new Thread(ReceiveLoop) { IsBackground = true, Name = $"OffloadRpc receive ({role})" };
        _socketThread = new Thread(SocketLoop) { IsBackground = true, Name = $"OffloadRpc socket ({role})" };
    }

    /// <summary>"client" or "server"; used in thread and segment names.</summary>
    public string Role { get; }

    public PeerInfo Peer { get; }

    /// <summary>The services the peer declared at the handshake (name to contract hash): served ones for a client, compiled-in ones for a server.</summary>
    public IReadOnlyDictionary<string, ulong> PeerContracts { get; init; } = new Dictionary<string, ulong>();

    public RingGeometry Geometry { get; }

    /// <summary>The arena this side writes its outgoing payloads into.</summary>
    public PayloadArena Arena => _arena;

    public bool IsClosed => Volatile.Read(ref _closed) != 0;

    /// <summary>Why the connection closed; null while it is open.</summary>
    public Exception? TerminalException => Volatile.Read(ref _terminal);

    /// <summary>Completes when both connection threads have exited and the connection's memory is given back.</summary>
    public Task Completion => Task.WhenAll(_receiveExited.Task, _socketExited.Task);

    /// <summary>Raised once, from a connection thread, after the connection closed.</summary>
    public event Action<RpcConnection, Exception>? Closed;

    internal void Start()
    {
        if (Volatile.Read(ref _started) == 0)
        {
            _channel.SetReceiveTimeout(TimeSpan.Zero); // may throw (socket disposed by a cancelled connect): then nothing started
            Volatile.Write(ref _started, 1);
            // UnsafeStart: the threads must not capture the starting code's ExecutionContext (an
            // OffloadCallContext of a call that connected onward would otherwise live on in them).
            _socketThread.UnsafeStart();
            _receiveThread.UnsafeStart();
        }
    }

    // ------------------------------------------------------------------ calls (client side)

    /// <summary>
    /// Sends a request and returns its reply. The body and payload bytes are copied into shared memory
    /// before this returns, so the caller may reuse its buffers at once; leases passed with
    /// <see cref="OutboundPayload.Move"/> belong to the peer afterwards.
    /// </summary>
    public ValueTask<RpcReply> CallAsync(int methodId, ReadOnlySpan<byte> body, ReadOnlySpan<OutboundPayload> payloads, CancellationToken cancellationToken = default)
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
                owned[i] = payloads[i].Lease is null ? OutboundPayload.Copy(payloads[i].Data.ToArray(), payloads[i].Mode, payloads[i].Cache) : payloads[i];
            }

            return CallWhenEntryFreeAsync(methodId, body.ToArray(), owned, cancellationToken);
        }

        return StartCall(call, methodId, body, payloads, cancellationToken);
    }

    private ValueTask<RpcReply> CallWhenEntryFreeAsync(int methodId, byte[] body, OutboundPayload[] payloads, CancellationToken cancellationToken) =>
        ConnectionAsync.CallWhenEntryFreeAsync(this, _calls, methodId, body, payloads, cancellationToken);

    internal ValueTask<RpcReply> StartCallAfterWait(PendingCall call, int methodId, byte[] body, OutboundPayload[] payloads, CancellationToken cancellationToken) =>
        StartCall(call, methodId, body, payloads, cancellationToken);

    private ValueTask<RpcReply> StartCall(PendingCall call, int methodId, ReadOnlySpan<byte> body, ReadOnlySpan<OutboundPayload> payloads, CancellationToken cancellationToken)
    {
        try
        {
            if (TrySendOffloaded(call, methodId, body, payloads, cancellationToken))
            {
                return new ValueTask<RpcReply>(call, call.Version); // published (and cancellation armed) once the copy is done
            }

            Send(MessageKind.Request, call.CallId, methodId, body, payloads, cancellationToken);
        }
        catch (Exception ex)
        {
            call.AbortBeforeSend();
            DisposeLeases(payloads); // a lease passed to a call is the call's, sent or not
            return ValueTask.FromException<RpcReply>(ex);
        }

        // The request is out. If the connection closed meanwhile, the receive thread's sweep may have
        // run before our entry was in flight: fail it here (FailOnClose is idempotent).
        Interlocked.MemoryBarrier();
        if (IsClosed)
        {
            call.FailOnClose(ClosedException());
        }
        else
        {
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
    /// the receive thread): when the ring is full the cancel waits in a queue flushed by later sends
    /// and by the receive thread.
    /// </summary>
    internal void TrySendCancel(ulong callId)
    {
        _pendingCancels.Enqueue(callId);
        FlushPendingCancels();
    }

    private void FlushPendingCancels()
    {
        if (IsClosed || !_outbound.Segment.TryAddReference())
        {
            return;
        }

        try
        {
            while (_pendingCancels.TryPeek(out ulong callId))
            {
                byte* slot = _outbound.Messages.TryReserve(out long position);
                if (slot is null)
                {
                    return;
                }

                _pendingCancels.TryDequeue(out _);
                WriteAndPublish(slot, position, MessageKind.Cancel, callId, 0, MessageFlags.None, [], []);
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
    /// Writes one message: payload bytes into the arena, leases detached, then a ring slot reserved,
    /// filled and published. Nothing is lost on failure: blocks are freed and leases restored.
    /// </summary>
    internal void Send(MessageKind kind, ulong callId, int methodId, ReadOnlySpan<byte> body, ReadOnlySpan<OutboundPayload> payloads, CancellationToken cancellationToken)
    {
        int slotSize = Geometry.SlotSize;
        bool bodyInPayload = MessageHeader.Size + (long)payloads.Length * PayloadRef.Size + body.Length > slotSize;
        int refCount = payloads.Length + (bodyInPayload ? 1 : 0);
        if (refCount > TransportProtocol.MaxPayloadsPerMessage || MessageHeader.Size + refCount * PayloadRef.Size > slotSize)
        {
            throw new ArgumentException($"A message carries at most {TransportProtocol.MaxPayloadsPerMessage} payloads (its body counts as one when it exceeds the slot).", nameof(payloads));
        }

        if (!_pendingCancels.IsEmpty)
        {
            FlushPendingCancels();
        }

        if (!_outbound.Segment.TryAddReference())
        {
            throw ClosedException();
        }

        Span<PayloadRef> refs = stackalloc PayloadRef[TransportProtocol.MaxPayloadsPerMessage];
        Span<DeferredCopy> deferred = stackalloc DeferredCopy[TransportProtocol.MaxPayloadsPerMessage];
        int deferredCount = 0;
        // Blocks this send allocated (each with a mapping reference); freed if the send fails.
        Span<long> allocatedOffsets = stackalloc long[TransportProtocol.MaxPayloadsPerMessage];
        // Only messages with arena blocks need the array (a small call stays allocation- and pool-free).
        SharedMemorySegment?[]? allocated = refCount == 0 ? null : System.Buffers.ArrayPool<SharedMemorySegment?>.Shared.Rent(TransportProtocol.MaxPayloadsPerMessage);
        int allocatedCount = 0;
        int detached = 0; // bit i: payload i's lease was detached by this send
        bool published = false;
        try
        {
            int r = 0;
            if (bodyInPayload)
            {
                refs[r++] = CopyIntoArena(body, TransferMode.Copy, CachePolicy.Auto, allocated!, allocatedOffsets, ref allocatedCount, ref deferred[0], out _, cancellationToken);
            }

            for (int i = 0; i < payloads.Length; i++)
            {
                SharedBuffer? lease = payloads[i].Lease;
                if (lease is null || lease.Host != this || !lease.CanMove)
                {
                    ReadOnlySpan<byte> data = lease is null ? payloads[i].Data.Span : lease.Span;
                    refs[r++] = CopyIntoArena(data, payloads[i].Mode, payloads[i].Cache, allocated!, allocatedOffsets, ref allocatedCount, ref deferred[deferredCount], out bool later, cancellationToken);
                    if (later)
                    {
                        deferred[deferredCount++].PayloadIndex = i;
                    }

                    continue;
                }

                if (!lease.TryDetach())
                {
                    throw new ObjectDisposedException(nameof(SharedBuffer), "A lease passed to a call was already disposed or passed on.");
                }

                detached |= 1 << i;
                refs[r++] = new PayloadRef
                {
                    SegmentId = lease.Segment.Id,
                    Flags = lease.IsOwnArena ? 0 : PayloadRef.ReceiverOwned,
                    Offset = lease.Offset,
                    Length = lease.Length,
                };
            }

            byte* slot = ReserveSlot(out long position, cancellationToken);

            // Past this point nothing fails short of the connection dying: mark our blocks lent
            // before the peer can see (and release) them.
            for (int i = 0; i < r; i++)
            {
                if ((refs[i].Flags & PayloadRef.ReceiverOwned) == 0)
                {
                    _arena.MarkLent(refs[i].SegmentId, refs[i].Offset, stillWriting: (refs[i].Flags & PayloadRef.Pipelined) != 0);
                }
            }

            WriteAndPublish(slot, position, kind, callId, methodId, bodyInPayload ? MessageFlags.BodyInPayload : MessageFlags.None, refs[..r], bodyInPayload ? default : body);
            published = true;

            // Pipelined payloads: the receiver already has the message and follows the progress word.
            for (int d = 0; d < deferredCount; d++)
            {
                OutboundPayload payload = payloads[deferred[d].PayloadIndex];
                WritePipelined(payload.Lease is { } foreign ? foreign.Span : payload.Data.Span, deferred[d]);
            }
        }
        finally
        {
            if (!published)
            {
                for (int i = 0; i < payloads.Length; i++)
                {
                    if ((detached & (1 << i)) != 0)
                    {
                        payloads[i].Lease!.Reattach();
                    }
                }
            }

            for (int i = 0; i < allocatedCount; i++)
            {
                SharedMemorySegment segment = allocated![i]!;
                if (!published)
                {
                    _arena.FreeLocal(segment.Id, allocatedOffsets[i]);
                }

                segment.Release();
                allocated[i] = null;
            }

            if (allocated is not null)
            {
                System.Buffers.ArrayPool<SharedMemorySegment?>.Shared.Return(allocated);
            }
            _outbound.Segment.Release();
        }

        // Published: the message is the peer's now. Nothing below may throw into a caller that would
        // then treat the call as unsent.
        for (int i = 0; i < payloads.Length; i++)
        {
            SharedBuffer? lease = payloads[i].Lease;
            if (lease is null)
            {
                continue;
            }

            if ((detached & (1 << i)) != 0)
            {
                lease.ReleaseDetachedMapping();
            }
            else
            {
                try
                {
                    lease.Dispose(); // copied from another connection: ownership moved, the original goes back
                }
                catch (Exception ex) when (ex is OffloadRpcException or ObjectDisposedException)
                {
                }
            }
        }
    }

    private PayloadRef CopyIntoArena(ReadOnlySpan<byte> data, TransferMode mode, CachePolicy cache, SharedMemorySegment?[] allocated, Span<long> allocatedOffsets, ref int allocatedCount, ref DeferredCopy later, out bool deferred, CancellationToken cancellationToken)
    {
        Engines.TransferPlan plan = Engines.TransferPolicy.Resolve(data.Length, mode, cache, _options.PipelineChunkBytes);
        deferred = plan.Mode == TransferMode.Pipelined;
        long header = deferred ? PipelineHeader.Size : 0;
        ArenaBlock block = _arena.Allocate(header + data.Length, cancellationToken);
        allocatedOffsets[allocatedCount] = block.Offset;
        allocated[allocatedCount++] = block.Segment; // the arena took a mapping reference for us
        if (deferred)
        {
            // Written after the message is published, chunk by chunk (see WritePipelined).
            var progress = (PipelineHeader*)block.Segment.Pointer(block.Offset, PipelineHeader.Size);
            *progress = new PipelineHeader { Total = data.Length };
            later = new DeferredCopy { SegmentId = block.Segment.Id, BlockOffset = block.Offset, Header = (nint)progress, Destination = (nint)(block.Segment.Pointer(block.Offset, header + data.Length) + header), Bypass = plan.BypassCache };
            return new PayloadRef { SegmentId = block.Segment.Id, Flags = PayloadRef.Pipelined, Offset = block.Offset, Length = data.Length };
        }

        byte* destination = block.Segment.Pointer(block.Offset, data.Length);
        fixed (byte* source = data)
        {
            Engines.PayloadMover.Move(source, destination, data.Length, plan);
        }

        return new PayloadRef { SegmentId = block.Segment.Id, Flags = 0, Offset = block.Offset, Length = data.Length };
    }

    /// <summary>A pipelined payload still to be written once its message is out.</summary>
    private struct DeferredCopy
    {
        public int PayloadIndex;
        public int SegmentId;
        public long BlockOffset;
        public nint Header;
        public nint Destination;
        public bool Bypass;
    }

    /// <summary>Writes a pipelined payload chunk by chunk, publishing the progress after each so the receiver can start.</summary>
    private void WritePipelined(ReadOnlySpan<byte> data, in DeferredCopy copy)
    {
        var header = (PipelineHeader*)copy.Header;
        fixed (byte* source = data)
        {
            long chunk = _options.PipelineChunkBytes;
            for (long done = 0; done < data.Length; done += chunk)
            {
                long length = Math.Min(chunk, data.Length - done);
                Engines.CopyRoutines.Copy(source + done, (byte*)copy.Destination + done, (nuint)length, copy.Bypass);
                Volatile.Write(ref header->BytesReady, done + length); // release: the bytes before it are in place
                Interlocked.Increment(ref header->ChunksReady); // full fence before reading the waiter flag
                if (Volatile.Read(ref header->ReceiverWaiting) != 0)
                {
                    Interop.LinuxNative.FutexWake(&header->ChunksReady, int.MaxValue);
                }
            }
        }

        Engines.TransferMetrics.Record(new Engines.TransferPlan(TransferMode.Pipelined, copy.Bypass ? CachePolicy.Bypass : CachePolicy.Inject), data.Length);
        _arena.FinishWriting(copy.SegmentId, copy.BlockOffset);
    }

    private byte* ReserveSlot(out long position, CancellationToken cancellationToken)
    {
        while (true)
        {
            ThrowIfClosed();
            byte* slot;
            try
            {
                slot = _outbound.Messages.TryReserve(out position);
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

            var condition = new RingHasSpace(this, _outbound.Messages, cancellationToken);
            SharedWait.Wait(ref condition, _outbound.MessageProducerWake, _sendSpin, singleWaiter: false);
            cancellationToken.ThrowIfCancellationRequested();
        }
    }

    private readonly struct RingHasSpace : IWaitCondition
    {
        private readonly RpcConnection _connection;
        private readonly ControlRing _ring;
        private readonly CancellationToken _cancellationToken;

        public RingHasSpace(RpcConnection connection, ControlRing ring, CancellationToken cancellationToken)
        {
            _connection = connection;
            _ring = ring;
            _cancellationToken = cancellationToken;
        }

        public bool IsSatisfied() => _ring.HasFreeSlot();

        public bool IsAbandoned() => _connection.IsClosed || _cancellationToken.IsCancellationRequested;
    }

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

    private void PostRelease(ulong handle)
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
                _overflowReleases.Enqueue(handle); // the receive thread posts it once the ring drains
                SharedWait.Wake(_outbound.ConsumerWake);
                return;
            }

            *(ulong*)(slot + 8) = handle;
            ring.Publish(position);
            SharedWait.Wake(_outbound.ReleaseConsumerWake); // an allocator waiting for space
            if (!ring.IsFree(position + ring.Capacity / 2))
            {
                SharedWait.Wake(_outbound.ConsumerWake); // half full: have the owner's receive thread drain it
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

    /// <summary>Posts releases that found the ring full (receive thread only).</summary>
    private void FlushOverflowReleases()
    {
        while (_overflowReleases.TryPeek(out ulong handle))
        {
            byte* slot = _outbound.Releases.TryReserve(out long position);
            if (slot is null)
            {
                break;
            }

            _overflowReleases.TryDequeue(out _);
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
    void IArenaPeer.WaitForSpace(PayloadArena arena, long freeGeneration, long deadline, CancellationToken cancellationToken)
    {
        if (!_inbound.Segment.TryAddReference())
        {
            throw ClosedException();
        }

        try
        {
            var condition = new SpaceReleased(this, arena, freeGeneration, deadline, cancellationToken);
            SharedWait.Wait(ref condition, _inbound.ReleaseConsumerWake, _arenaSpin, singleWaiter: false);
        }
        finally
        {
            _inbound.Segment.Release();
        }
    }

    /// <summary>Wakes this process's threads waiting for arena space (after a local free).</summary>
    void IArenaPeer.WakeSpaceWaiters()
    {
        if (_inbound.Segment.TryAddReference())
        {
            SharedWait.Wake(_inbound.ReleaseConsumerWake);
            _inbound.Segment.Release();
        }
    }

    private readonly struct SpaceReleased : IWaitCondition
    {
        private readonly RpcConnection _connection;
        private readonly PayloadArena _arena;
        private readonly long _generation;
        private readonly long _deadline;
        private readonly CancellationToken _cancellationToken;

        public SpaceReleased(RpcConnection connection, PayloadArena arena, long generation, long deadline, CancellationToken cancellationToken)
        {
            _connection = connection;
            _arena = arena;
            _generation = generation;
            _deadline = deadline;
            _cancellationToken = cancellationToken;
        }

        public bool IsSatisfied() => _arena.FreeGeneration != _generation || _connection._inbound.Releases.HasMessage();

        public bool IsAbandoned() => _connection.IsClosed || _cancellationToken.IsCancellationRequested || Stopwatch.GetTimestamp() > _deadline;
    }

    void IArenaPeer.DrainReleases(PayloadArena arena) => DrainReleases(arena);

    private void DrainReleases(PayloadArena arena)
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

    void IArenaPeer.AnnounceSegment(SharedMemorySegment segment)
    {
        ThrowIfClosed();
        Span<byte> frame = stackalloc byte[12];
        BinaryPrimitives.WriteInt32LittleEndian(frame, segment.Id);
        BinaryPrimitives.WriteInt64LittleEndian(frame[4..], segment.Size);
        long expected;
        lock (_announceLock)
        {
            expected = ++_announcesSent;
        }

        _channel.Send(FrameType.AddSegment, frame, [segment.FileDescriptor]);
        long deadline = _options.HandshakeTimeout == Timeout.InfiniteTimeSpan ? long.MaxValue : Stopwatch.GetTimestamp() + (long)(_options.HandshakeTimeout.TotalSeconds * Stopwatch.Frequency);
        lock (_announceLock)
        {
            while (_announcesAcknowledged < expected)
            {
                ThrowIfClosed();
                if (Stopwatch.GetTimestamp() > deadline)
                {
                    var timeout = new ProtocolViolationException($"The peer did not map segment {segment.Id} within {_options.HandshakeTimeout.TotalSeconds:0.#} s.");
                    Terminate(timeout);
                    throw timeout;
                }

                Monitor.Wait(_announceLock, 50);
            }
        }
    }

    void IArenaPeer.RetireSegment(int segmentId)
    {
        Span<byte> frame = stackalloc byte[4];
        BinaryPrimitives.WriteInt32LittleEndian(frame, segmentId);
        try
        {
            _channel.Send(FrameType.RemoveSegment, frame);
        }
        catch (OffloadRpcException)
        {
        }
    }

    // ------------------------------------------------------------------ closing

    public void ThrowIfClosed()
    {
        if (IsClosed)
        {
            throw ClosedException();
        }
    }

    private Exception ClosedException() => Volatile.Read(ref _terminal) switch
    {
        PeerDisconnectedException e => new PeerDisconnectedException(e.Message, e),
        ProtocolViolationException e => new ProtocolViolationException(e.Message, e),
        ObjectDisposedException => new ObjectDisposedException(nameof(RpcConnection), "The connection was disposed."),
        { } e => new PeerDisconnectedException("The connection is closed: " + e.Message, e),
        null => new PeerDisconnectedException("The connection is closed."),
    };

    /// <summary>Closes the connection for <paramref name="reason"/> (first reason wins) and wakes every waiter.</summary>
    internal void Terminate(Exception reason)
    {
        if (Interlocked.CompareExchange(ref _terminal, reason, null) is not null)
        {
            return;
        }

        Interlocked.Exchange(ref _closed, 1);
        if (_inbound.Segment.TryAddReference())
        {
            SharedWait.WakeUnconditionally(_inbound.ConsumerWake);
            SharedWait.WakeUnconditionally(_inbound.ReleaseConsumerWake);
            _inbound.Segment.Release();
        }

        if (_outbound.Segment.TryAddReference())
        {
            SharedWait.WakeUnconditionally(_outbound.MessageProducerWake);
            _outbound.Segment.Release();
        }

        lock (_announceLock)
        {
            Monitor.PulseAll(_announceLock);
        }

        _channel.Shutdown();
        if (Volatile.Read(ref _started) == 0)
        {
            // Never started: nothing else will release the resources.
            ReleaseResources(reason);
            _receiveExited.TrySetResult();
            _socketExited.TrySetResult();
        }
    }

    /// <summary>
    /// Closes the connection and completes once its threads have exited and its memory is given back.
    /// Safe to await from a continuation running on the receive thread: awaiting yields the thread,
    /// which then exits and completes the wait.
    /// </summary>
    public ValueTask DisposeAsync()
    {
        Terminate(new ObjectDisposedException(nameof(RpcConnection)));
        return ConnectionAsync.DisposeAfterAsync(Completion, _channel);
    }

    private void ReleaseResources(Exception reason)
    {
        _calls.FailAll(ClosedException());
        for (int i = 0; i < _servedCalls.Length; i++)
        {
            Volatile.Read(ref _servedCalls[i])?.Cancel(null);
        }

        _arena.Close();
        for (int i = 0; i < _peerSegments.Length; i++)
        {
            Interlocked.Exchange(ref _peerSegments[i], null)?.Release();
        }

        _inbound.Segment.Release();
        _outbound.Segment.Release();
        try
        {
            Closed?.Invoke(this, reason);
        }
        catch (Exception ex) when (ex is not OutOfMemoryException)
        {
            Trace.TraceError($"OffloadRpc: a Closed handler threw: {ex}");
        }
    }

    // ------------------------------------------------------------------ hooks for the protocol-violation tests

    /// <summary>Test hook: this side's outbound control area, to write raw (possibly corrupt) slots.</summary>
    internal ControlArea OutboundArea => _outbound;

    /// <summary>Test hook: the socket, to send raw frames.</summary>
    internal SocketChannel Channel => _channel;

    /// <summary>Test hook: reserves the next outbound slot without writing it.</summary>
    internal byte* ReserveRawSlot(out long position) => ReserveSlot(out position, CancellationToken.None);

    /// <summary>Test hook: wakes the peer's receive thread without publishing anything.</summary>
    internal void WakePeerConsumer() => SharedWait.WakeUnconditionally(_outbound.ConsumerWake);

    /// <summary>Test hook: publishes a slot written by hand and wakes the peer.</summary>
    /// <summary>The one place a message is laid out in a reserved slot: header, payload references, inline body; then published and the receiver woken.</summary>
    private void WriteAndPublish(byte* slot, long position, MessageKind kind, ulong callId, int methodId, MessageFlags flags, ReadOnlySpan<PayloadRef> refs, ReadOnlySpan<byte> body)
    {
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

    internal void PublishRawSlot(long position)
    {
        _outbound.Messages.Publish(position);
        SharedWait.Wake(_outbound.ConsumerWake);
    }

    public override string ToString() => $"RpcConnection({Role}, peer pid {Peer.ProcessId}, {(IsClosed ? "closed" : "open")})";
}

/// <summary>Who is on the other end, from SO_PEERCRED.</summary>
internal readonly record struct PeerInfo(int ProcessId, uint UserId, uint GroupId);
