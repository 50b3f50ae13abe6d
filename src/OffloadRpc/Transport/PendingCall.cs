using System.Threading.Tasks.Sources;

namespace OffloadRpc.Transport;

/// <summary>
/// One outgoing call awaiting its response: a pooled <see cref="IValueTaskSource{TResult}"/> so a call
/// allocates nothing. Its index in the table is part of the call id; the generation in the upper bits
/// tells a current response from a forged one.
/// <para>
/// An entry is recycled when two holds are dropped: the response hold (the response arrived, was
/// abandoned, or the connection died) and the caller hold (the caller disposed the reply or observed
/// an exception). So a cancelled call keeps its entry until the server has answered, and responses in
/// flight never outnumber the response ring's slots.
/// </para>
/// </summary>
internal sealed class PendingCall : InboundMessage, IValueTaskSource<RpcReply>
{
    public const int IndexBits = 20;

    private const int StateFree = 0;
    private const int StateInFlight = 1;
    private const int StateCompleted = 2;
    private const int StateAbandoned = 3;
    private const int StateFailed = 4;

    private readonly PendingCallTable _table;
    private ManualResetValueTaskSourceCore<RpcReply> _core;
    private CancellationTokenRegistration _registration;
    private CancellationToken _cancellationToken;
    private int _state;
    private int _holds;
    private int _replyDisposed;
    private ulong _generation;

    public PendingCall(RpcConnection connection, PendingCallTable table, int index, bool runContinuationsAsynchronously)
        : base(connection, connection.Geometry.SlotSize)
    {
        _table = table;
        Index = index;
        _core.RunContinuationsAsynchronously = runContinuationsAsynchronously;
    }

    public int Index { get; }

    public ulong CallId => (_generation << IndexBits) | (uint)Index;

    public short Version => _core.Version;

    public bool IsFree => Volatile.Read(ref _state) == StateFree;

    public bool TryClaim()
    {
        if (Interlocked.CompareExchange(ref _state, StateInFlight, StateFree) != StateFree)
        {
            return false;
        }

        _holds = 2;
        _replyDisposed = 0;
        return true;
    }

    /// <summary>Arms cancellation once the request is published.</summary>
    public void RegisterCancellation(CancellationToken cancellationToken)
    {
        if (cancellationToken.CanBeCanceled)
        {
            _cancellationToken = cancellationToken;
            _registration = cancellationToken.UnsafeRegister(static s => ((PendingCall)s!).OnCancel(), this);
        }
    }

    /// <summary>The request could not be sent: give the entry back as if nothing happened.</summary>
    public void AbortBeforeSend()
    {
        _holds = 0;
        Recycle();
    }

    private void OnCancel()
    {
        if (Interlocked.CompareExchange(ref _state, StateAbandoned, StateInFlight) != StateInFlight)
        {
            return;
        }

        Connection.TrySendCancel(CallId);
        _core.SetException(new OperationCanceledException(_cancellationToken));
    }

    /// <summary>The receive thread matched a response to this entry. Returns false for an abandoned call (the caller gave up).</summary>
    public bool IsAwaitingResponse(ulong callId, out bool abandoned)
    {
        int state = Volatile.Read(ref _state);
        abandoned = state == StateAbandoned;
        return callId == CallId && (state == StateInFlight || state == StateAbandoned);
    }

    /// <summary>Completes with the response the receive thread has copied into this message.</summary>
    public void CompleteWithResponse()
    {
        if (Interlocked.CompareExchange(ref _state, StateCompleted, StateInFlight) == StateInFlight)
        {
            _registration.Unregister();
            _core.SetResult(new RpcReply(this, _core.Version));
        }
        else
        {
            ReleaseUntakenPayloads(); // cancelled meanwhile: nobody will read it
        }

        DropHold();
    }

    /// <summary>Completes with a remote fault (or any exception) decoded by the receive thread.</summary>
    public void CompleteWithException(Exception exception)
    {
        ReleaseUntakenPayloads();
        if (Interlocked.CompareExchange(ref _state, StateFailed, StateInFlight) == StateInFlight)
        {
            _registration.Unregister();
            _core.SetException(exception);
        }

        DropHold();
    }

    /// <summary>The connection is gone: fail a call still waiting, and drop the response hold of an abandoned one.</summary>
    public void FailOnClose(Exception reason)
    {
        int state = Volatile.Read(ref _state);
        if (state == StateInFlight && Interlocked.CompareExchange(ref _state, StateFailed, StateInFlight) == StateInFlight)
        {
            _registration.Unregister();
            _core.SetException(reason);
            DropHold();
        }
        else if (state == StateAbandoned && Interlocked.CompareExchange(ref _state, StateFailed, StateAbandoned) == StateAbandoned)
        {
            DropHold();
        }
    }

    public RpcReply GetResult(short token)
    {
        try
        {
            return _core.GetResult(token);
        }
        catch
        {
            DropHold(); // the caller has seen the outcome; there is no reply to dispose
            throw;
        }
    }

    public ValueTaskSourceStatus GetStatus(short token) => _core.GetStatus(token);

    public void OnCompleted(Action<object?> continuation, object? state, short token, ValueTaskSourceOnCompletedFlags flags) =>
        _core.OnCompleted(continuation, state, token, flags);

    /// <summary>The caller is done with the reply.</summary>
    public void DisposeReply(short version)
    {
        if (version == _core.Version && Interlocked.Exchange(ref _replyDisposed, 1) == 0)
        {
            DropHold();
        }
    }

    public void ThrowIfReplyGone(short version)
    {
        ObjectDisposedException.ThrowIf(version != _core.Version || Volatile.Read(ref _replyDisposed) != 0, typeof(RpcReply));
    }

    private void DropHold()
    {
        if (Interlocked.Decrement(ref _holds) == 0)
        {
            Recycle();
        }
    }

    private void Recycle()
    {
        ResetMessage();
        _registration = default;
        _cancellationToken = default;
        _generation = (_generation + 1) & ((1UL << (64 - IndexBits)) - 1);
        _core.Reset();
        _table.Return(this);
    }

    internal void MarkFree() => Interlocked.Exchange(ref _state, StateFree);
}

/// <summary>The reply to a call: its body and payloads. Dispose it to recycle the call's entry.</summary>
internal readonly struct RpcReply : IDisposable
{
    private readonly PendingCall _call;
    private readonly short _version;

    public RpcReply(PendingCall call, short version)
    {
        _call = call;
        _version = version;
    }

    public ReadOnlySpan<byte> Body
    {
        get
        {
            _call.ThrowIfReplyGone(_version);
            return _call.Body;
        }
    }

    public int PayloadCount
    {
        get
        {
            _call.ThrowIfReplyGone(_version);
            return _call.PayloadCount;
        }
    }

    public int PayloadLength(int index)
    {
        _call.ThrowIfReplyGone(_version);
        return _call.PayloadLength(index);
    }

    public SharedBuffer TakePayload(int index)
    {
        _call.ThrowIfReplyGone(_version);
        return _call.TakePayload(index);
    }

    public void Dispose() => _call?.DisposeReply(_version);
}

/// <summary>
/// The fixed set of <see cref="PendingCall"/> entries of a connection, as many as the response ring
/// has slots. Claiming is a lock-free scan; only a caller that finds the table full takes the slow
/// path and awaits an entry.
/// </summary>
internal sealed class PendingCallTable
{
    private readonly PendingCall[] _entries;
    private readonly int _mask;
    private readonly object _waitLock = new();
    private readonly Queue<TaskCompletionSource> _waiters = new();
    private int _cursor;
    private int _waiterCount;
    private volatile bool _closed;

    public PendingCallTable(RpcConnection connection, int capacity, bool runContinuationsAsynchronously)
    {
        _entries = new PendingCall[capacity];
        _mask = capacity - 1;
        for (int i = 0; i < capacity; i++)
        {
            _entries[i] = new PendingCall(connection, this, i, runContinuationsAsynchronously);
        }
    }

    public int Capacity => _entries.Length;

    public PendingCall? TryClaim()
    {
        for (int attempt = 0; attempt < _entries.Length; attempt++)
        {
            PendingCall entry = _entries[Interlocked.Increment(ref _cursor) & _mask];
            if (entry.IsFree && entry.TryClaim())
            {
                return entry;
            }
        }

        return null;
    }

    /// <summary>Waits for a free entry (the table was full).</summary>
    public async ValueTask<PendingCall> ClaimAsync(RpcConnection connection, CancellationToken cancellationToken)
    {
        Interlocked.Increment(ref _waiterCount);
        try
        {
            while (true)
            {
                connection.ThrowIfClosed();
                PendingCall? entry = TryClaim();
                if (entry is not null)
                {
                    return entry;
                }

                var signal = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
                lock (_waitLock)
                {
                    _waiters.Enqueue(signal);
                }

                entry = TryClaim(); // an entry freed before we queued would not have signalled us
                if (entry is not null)
                {
                    return entry;
                }

                if (_closed)
                {
                    connection.ThrowIfClosed();
                }

                await signal.Task.WaitAsync(cancellationToken).ConfigureAwait(false);
            }
        }
        finally
        {
            Interlocked.Decrement(ref _waiterCount);
        }
    }

    public void Return(PendingCall entry)
    {
        entry.MarkFree(); // full fence before reading the waiter count
        if (Volatile.Read(ref _waiterCount) != 0)
        {
            SignalWaiters();
        }
    }

    private void SignalWaiters()
    {
        TaskCompletionSource[] signals;
        lock (_waitLock)
        {
            signals = _waiters.ToArray();
            _waiters.Clear();
        }

        foreach (TaskCompletionSource signal in signals)
        {
            signal.TrySetResult();
        }
    }

    /// <summary>Looks up the entry a response names; null when the index is out of range.</summary>
    public PendingCall? Find(ulong callId)
    {
        ulong index = callId & ((1UL << PendingCall.IndexBits) - 1);
        return index < (ulong)_entries.Length ? _entries[index] : null;
    }

    public void FailAll(Exception reason)
    {
        _closed = true;
        foreach (PendingCall entry in _entries)
        {
            entry.FailOnClose(reason);
        }

        SignalWaiters();
    }
}
