using System.Collections.Concurrent;
using System.Diagnostics;
using System.Runtime.CompilerServices;
using System.Threading.Tasks.Sources;

namespace OffloadRpc.Transport;

/// <summary>
/// The receiving end of one stream (a call's streamed result on the client, a streamed argument on the
/// server): the poller delivers items as they arrive, the consumer takes them one at a time and gives
/// each back when it moves on, which returns credit to the producer. The producer may have at most
/// <see cref="Window"/> items beyond the credit it was granted; one more is a protocol violation, so a
/// peer cannot grow this side's memory past the window.
/// </summary>
internal sealed class StreamInbox : IValueTaskSource<bool>
{
    private readonly object _gate = new();
    private readonly Queue<StreamItemMessage> _items = new();
    private readonly ConcurrentQueue<StreamItemMessage> _pool = new();
    private readonly int _creditBatch;
    // One reusable wait (one consumer waits at a time): no allocation per item. The consumer resumes
    // inline on the poller that delivered its item unless the connection runs continuations asynchronously,
    // as a unary call's awaiter does; the consumer only sends credit (never blocks), so that is safe there.
    private ManualResetValueTaskSourceCore<bool> _core;
    private bool _waiting;
    private Exception? _error;
    private bool _ended;
    private bool _closed;
    private long _received;
    private long _granted;
    private int _uncredited;
    private ulong _callId;

    public StreamInbox(RpcConnection connection, int window, bool runContinuationsAsynchronously = true)
    {
        Connection = connection;
        _core.RunContinuationsAsynchronously = runContinuationsAsynchronously;
        Window = Math.Max(1, window);
        _creditBatch = Math.Max(1, Window / 4);
    }

    public RpcConnection Connection { get; }

    /// <summary>The most items the producer may have sent and this side not yet taken.</summary>
    public int Window { get; }

    /// <summary>The call the stream belongs to (known once the call is claimed).</summary>
    public void Attach(ulong callId) => _callId = callId;

    /// <summary>Tells the producer how many items it may send before it waits for credit.</summary>
    public void GrantInitialCredit()
    {
        lock (_gate)
        {
            if (_granted != 0 || _closed)
            {
                return;
            }

            _granted = Window;
        }

        Connection.TrySendControl(MessageKind.StreamCredit, _callId, Window);
    }

    // ------------------------------------------------------------------ the poller's side

    /// <summary>An item message for the next delivery (the poller fills its body and payloads).</summary>
    public StreamItemMessage RentItem() => _pool.TryDequeue(out StreamItemMessage? item) ? item : new StreamItemMessage(Connection, this);

    /// <summary>One more item came: a protocol violation when it exceeds the credit granted.</summary>
    public bool AdmitItem()
    {
        lock (_gate)
        {
            return ++_received <= _granted;
        }
    }

    /// <summary>Queues a received item for the consumer, or gives it back at once when the consumer has left.</summary>
    public void Deliver(StreamItemMessage item)
    {
        bool wake = false;
        lock (_gate)
        {
            if (!_closed && !_ended)
            {
                _items.Enqueue(item);
                wake = TakeWaiter();
                item = null!;
            }
        }

        if (item is not null)
        {
            Recycle(item);
        }

        if (wake)
        {
            _core.SetResult(true);
        }
    }

    /// <summary>Under the gate: whether a consumer waits (it is then woken outside the gate, once).</summary>
    private bool TakeWaiter()
    {
        bool waiting = _waiting;
        _waiting = false;
        return waiting;
    }

    /// <summary>
    /// No item will come any more: the stream ended (<paramref name="error"/> null), failed (the producer's
    /// exception, delivered after the items already here), or broke (<paramref name="discardQueued"/>:
    /// peer death or cancellation, delivered at once; items not yet taken are given back).
    /// </summary>
    public void Complete(Exception? error, bool discardQueued)
    {
        bool wake;
        StreamItemMessage[]? discarded = null;
        lock (_gate)
        {
            if (_ended)
            {
                return;
            }

            _ended = true;
            _error = error;
            if (discardQueued && _items.Count > 0)
            {
                discarded = _items.ToArray();
                _items.Clear();
            }

            wake = TakeWaiter();
        }

        if (discarded is not null)
        {
            foreach (StreamItemMessage item in discarded)
            {
                Recycle(item);
            }
        }

        if (wake)
        {
            _core.SetResult(false);
        }
    }

    // ------------------------------------------------------------------ the consumer's side

    /// <summary>The next item (null: the stream ended); throws the stream's failure once the items before it are taken.</summary>
    public ValueTask<StreamItemMessage?> ReadAsync()
    {
        lock (_gate)
        {
            if (_items.TryDequeue(out StreamItemMessage? item))
            {
                return new ValueTask<StreamItemMessage?>(item);
            }

            if (_ended)
            {
                return _error is null ? new ValueTask<StreamItemMessage?>((StreamItemMessage?)null) : ValueTask.FromException<StreamItemMessage?>(Rethrowable(_error));
            }

            Debug.Assert(!_waiting, "one consumer reads a stream");
            _core.Reset();
            _waiting = true;
            return WaitThenReadAsync(new ValueTask<bool>(this, _core.Version));
        }
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder<>))]
    private async ValueTask<StreamItemMessage?> WaitThenReadAsync(ValueTask<bool> signal)
    {
        await signal.ConfigureAwait(false);
        return await ReadAsync().ConfigureAwait(false);
    }

    bool IValueTaskSource<bool>.GetResult(short token) => _core.GetResult(token);

    ValueTaskSourceStatus IValueTaskSource<bool>.GetStatus(short token) => _core.GetStatus(token);

    void IValueTaskSource<bool>.OnCompleted(Action<object?> continuation, object? state, short token, ValueTaskSourceOnCompletedFlags flags) =>
        _core.OnCompleted(continuation, state, token, flags);

    /// <summary>A failure thrown to the consumer: each throw gets its own exception object so stack traces do not pile up on a shared one.</summary>
    private static Exception Rethrowable(Exception error) => error switch
    {
        RemoteInvocationException remote => new RemoteInvocationException(remote.RemoteExceptionType, remote.RemoteMessage, remote.RemoteStackTrace),
        _ => error,
    };

    /// <summary>The consumer has moved past <paramref name="item"/>: its memory goes back and the producer gets credit for it.</summary>
    public void Consumed(StreamItemMessage item)
    {
        Recycle(item);
        int credit = 0;
        lock (_gate)
        {
            if (!_ended && !_closed && ++_uncredited >= _creditBatch)
            {
                credit = _uncredited;
                _uncredited = 0;
                _granted += credit;
            }
        }

        if (credit > 0)
        {
            Connection.TrySendControl(MessageKind.StreamCredit, _callId, credit);
        }
    }

    /// <summary>The consumer has left: every item queued or still to come is given back.</summary>
    public void Close()
    {
        StreamItemMessage[] queued;
        bool wake;
        lock (_gate)
        {
            _closed = true;
            queued = _items.ToArray();
            _items.Clear();
            wake = TakeWaiter();
        }

        foreach (StreamItemMessage item in queued)
        {
            Recycle(item);
        }

        if (wake)
        {
            _core.SetResult(false);
        }
    }

    private void Recycle(StreamItemMessage item)
    {
        item.Release();
        if (_pool.Count < Window)
        {
            _pool.Enqueue(item);
        }
    }
}

/// <summary>
/// One received stream item: its body and payloads, read by generated code as a reply is. Payloads the
/// decoder lends (memory in place) stay valid until the consumer moves on; taken ones (leases) are the consumer's.
/// </summary>
internal sealed class StreamItemMessage : InboundMessage, IReplySource
{
    private List<SharedBuffer>? _lent;
    private short _version;

    public StreamItemMessage(RpcConnection connection, StreamInbox? inbox)
        : base(connection) => Inbox = inbox;

    /// <summary>The stream the item belongs to (null: an item nobody waits for, given back at once).</summary>
    public StreamInbox? Inbox { get; }

    public short Version => _version;

    /// <summary>Payload <paramref name="index"/> in place, until the item is released.</summary>
    public SharedBuffer LendPayload(int index)
    {
        SharedBuffer lease = TakePayload(index);
        (_lent ??= new List<SharedBuffer>(1)).Add(lease);
        return lease;
    }

    SharedBuffer IReplySource.LendPayload(int index) => LendPayload(index);

    public void ThrowIfReplyGone(short version) => ObjectDisposedException.ThrowIf(version != _version, typeof(StreamItemMessage));

    public void DisposeReply(short version)
    {
        // The inbox releases the item when the consumer moves on.
    }

    public void AbortConnection(ProtocolViolationException violation) =>
        Connection.Terminate(new ProtocolViolationException($"Protocol violation by peer process {Connection.Peer.ProcessId}: {violation.Message} The connection is closed.", violation));

    /// <summary>Gives back what the item holds (lent payloads and any not taken) and readies it for another item.</summary>
    public void Release()
    {
        _version++;
        if (_lent is not null)
        {
            foreach (SharedBuffer lease in _lent)
            {
                lease.Dispose();
            }

            _lent.Clear();
        }

        ResetMessage();
    }
}

/// <summary>
/// Where the items of a client's streamed argument go on a transport other than shared memory (gRPC):
/// it queues each item (copied, leases taken over) and sends it in order after the request.
/// </summary>
internal interface IStreamItemSink
{
    void SendItem(ReadOnlySpan<byte> body, ReadOnlySpan<OutboundPayload> payloads, CancellationToken cancellationToken);

    void End();

    void Fail(Exception exception);
}

/// <summary>
/// The producing end of one stream: credit granted by the consumer, taken one per item. A producer
/// without credit waits (asynchronously) for the consumer to take items; that is the backpressure. The
/// wait is one reusable value-task source (one producer waits at a time): no allocation per wait. Its
/// continuation runs on the thread pool, never on the poller that delivered the credit (the producer
/// goes on to send, which may wait for ring or arena space).
/// </summary>
internal sealed class StreamOutbox : IValueTaskSource
{
    private readonly object _gate = new();
    private long _credit;
    private ManualResetValueTaskSourceCore<bool> _core = new() { RunContinuationsAsynchronously = true };
    private bool _waiting;
    private CancellationToken _waitToken;
    private CancellationTokenRegistration _cancellation;
    private RpcConnection? _connection;
    private IStreamItemSink? _sink;
    private ulong _callId;

    /// <summary>A client's streamed argument: the call it belongs to, known once its entry is claimed (before the request is out).</summary>
    public void Attach(RpcConnection connection, ulong callId)
    {
        _callId = callId;
        Volatile.Write(ref _connection, connection);
    }

    /// <summary>A client's streamed argument over another transport: its items go to <paramref name="sink"/>.</summary>
    public void Attach(IStreamItemSink sink) => Volatile.Write(ref _sink, sink);

    private RpcConnection Connection => Volatile.Read(ref _connection) ?? throw new InvalidOperationException("The stream's call was not sent.");

    /// <summary>Sends one item of a client's streamed argument (waits for ring and arena space: not on the poller).</summary>
    public void SendItem(ReadOnlySpan<byte> body, ReadOnlySpan<OutboundPayload> payloads, CancellationToken cancellationToken)
    {
        if (Volatile.Read(ref _sink) is { } sink)
        {
            sink.SendItem(body, payloads, cancellationToken);
            return;
        }

        Connection.Send(MessageKind.StreamItem, _callId, 0, body, payloads, cancellationToken);
    }

    /// <summary>The client's streamed argument has no more items (after the last one: never overtakes it).</summary>
    public void End()
    {
        if (Volatile.Read(ref _sink) is { } sink)
        {
            sink.End();
            return;
        }

        Connection.TrySendControl(MessageKind.StreamEnd, _callId, 0);
    }

    /// <summary>The client's streamed argument failed: the server's enumeration throws it as a <see cref="RemoteInvocationException"/>.</summary>
    public void Fail(Exception exception)
    {
        if (Volatile.Read(ref _sink) is { } sink)
        {
            sink.Fail(exception);
            return;
        }

        RpcConnection connection = Connection;
        byte[] buffer = System.Buffers.ArrayPool<byte>.Shared.Rent(FaultCodec.MaxEncodedLength);
        try
        {
            int length = FaultCodec.Encode(exception, buffer, connection.Geometry.SlotSize, full: false); // fits in the slot: no arena
            connection.Send(MessageKind.StreamFault, _callId, 0, buffer.AsSpan(0, length), default, CancellationToken.None);
        }
        finally
        {
            System.Buffers.ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    /// <summary>The consumer took <paramref name="items"/> more (on the poller; never blocks). False when the total makes no sense.</summary>
    public bool Grant(int items)
    {
        lock (_gate)
        {
            _credit += items;
            if (_credit > int.MaxValue / 2)
            {
                return false;
            }

            if (!_waiting || _credit <= 0)
            {
                return true;
            }

            _credit--; // the waiting producer's item
            _waiting = false;
        }

        _core.SetResult(true);
        return true;
    }

    /// <summary>Takes one item's credit, waiting for the consumer when there is none.</summary>
    public ValueTask WaitAsync(CancellationToken cancellationToken)
    {
        lock (_gate)
        {
            if (_credit > 0)
            {
                _credit--;
                return ValueTask.CompletedTask;
            }

            if (cancellationToken.IsCancellationRequested)
            {
                return ValueTask.FromCanceled(cancellationToken);
            }

            Debug.Assert(!_waiting, "one producer waits for credit at a time");
            _core.Reset();
            _waiting = true;
            _waitToken = cancellationToken;
            if (cancellationToken.CanBeCanceled)
            {
                // Under the gate, so that credit cannot complete the wait (and GetResult dispose the registration)
                // before it is stored; a token cancelled meanwhile runs Cancel inline (the gate is reentrant).
                _cancellation = cancellationToken.UnsafeRegister(static state => ((StreamOutbox)state!).Cancel(), this);
            }

            return new ValueTask(this, _core.Version);
        }
    }

    private void Cancel()
    {
        lock (_gate)
        {
            if (!_waiting)
            {
                return; // credit came first
            }

            _waiting = false;
        }

        _core.SetException(new OperationCanceledException(_waitToken));
    }

    void IValueTaskSource.GetResult(short token)
    {
        // Dispose waits for a cancellation callback that is running; after it nothing completes this wait again.
        _cancellation.Dispose();
        _cancellation = default;
        _core.GetResult(token);
    }

    ValueTaskSourceStatus IValueTaskSource.GetStatus(short token) => _core.GetStatus(token);

    void IValueTaskSource.OnCompleted(Action<object?> continuation, object? state, short token, ValueTaskSourceOnCompletedFlags flags) =>
        _core.OnCompleted(continuation, state, token, flags);
}
