using System.Diagnostics;
using System.Threading.Tasks.Sources;

namespace OffloadRpc.Transport;

/// <summary>
/// One outgoing call awaiting its response: a pooled <see cref="IValueTaskSource{TResult}"/> so a call
/// allocates nothing. Its index in the table is part of the call id; the generation in the upper bits
/// tells a current response from a forged one.
/// <para>
/// An entry is recycled when two holds are dropped. The response hold belongs to the receive side:
/// it is dropped exactly once, by whoever claims the response (the receiver when it arrives, or
/// the close sweep when it never will). The caller hold belongs to the caller: it is dropped when the
/// caller disposes the reply or observes an exception, and it also owns the cancellation
/// registration, so a cancellation callback can never run against a recycled entry. A cancelled call
/// keeps its entry until the server has answered, so responses in flight never outnumber the
/// response ring's slots.
/// </para>
/// </summary>
internal sealed class PendingCall : InboundMessage, IValueTaskSource<RpcReply>, IReplySource
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
    private int _responseClaimed;
    private int _callerReleased;
    private ulong _generation;
    private long _sentAt; // 0 while not in flight
    private int _latencyClass;
    private bool _countedFast;

    public PendingCall(RpcConnection connection, PendingCallTable table, int index, bool runContinuationsAsynchronously)
        : base(connection)
    {
        _table = table;
        Index = index;
        _core.RunContinuationsAsynchronously = runContinuationsAsynchronously;
    }

    public int Index { get; }

    /// <summary>Where the items of a streamed result go (null: not a streaming call). Set before the request is out, cleared on recycling.</summary>
    public StreamInbox? Inbox { get; set; }

    /// <summary>Credit for the items of a streamed argument (null: the call streams nothing out). Set before the request is out, cleared on recycling.</summary>
    public StreamOutbox? Outbox { get; set; }

    /// <summary>The outbox of call <paramref name="callId"/> while it is in flight; null otherwise.</summary>
    public StreamOutbox? OutboxFor(ulong callId) => callId == CallId && Volatile.Read(ref _state) == StateInFlight ? Outbox : null;

    /// <summary>
    /// The inbox of call <paramref name="callId"/> while its items may still come (in flight or
    /// cancelled, its reply not yet here); null when the id is not this entry's current streaming call.
    /// </summary>
    public StreamInbox? InboxFor(ulong callId)
    {
        int state = Volatile.Read(ref _state);
        return callId == CallId && (state == StateInFlight || state == StateAbandoned) && Volatile.Read(ref _responseClaimed) == 0 ? Inbox : null;
    }

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
        _responseClaimed = 0;
        _callerReleased = 0;
        return true;
    }

    /// <summary>Arms cancellation once the request is published. Only the caller touches the registration.</summary>
    public void RegisterCancellation(CancellationToken cancellationToken)
    {
        if (cancellationToken.CanBeCanceled)
        {
            _cancellationToken = cancellationToken;
            _registration = cancellationToken.UnsafeRegister(static s => ((PendingCall)s!).OnCancel(), this);
        }
    }

    /// <summary>
    /// The request is about to go out: from now on a reply may arrive on the poller, which spins for it
    /// when calls of this method usually answer within the spin budget.
    /// </summary>
    public void BeginFlight(int methodId, long now)
    {
        Debug.Assert(now != 0, "0 means not in flight");
        _latencyClass = PendingCallTable.LatencyClassOf(methodId);
        _countedFast = _table.EnterFlight(_latencyClass);
        Volatile.Write(ref _sentAt, now);
    }

    /// <summary>The reply came, or never will: once per call, with how long it took when it came.</summary>
    private void EndFlight(bool answered)
    {
        long sentAt = Interlocked.Exchange(ref _sentAt, 0);
        if (sentAt != 0)
        {
            _table.LeaveFlight(_latencyClass, answered ? Stopwatch.GetTimestamp() - sentAt : -1, _countedFast);
        }
    }

    /// <summary>The request could not be sent: give the entry back as if nothing happened.</summary>
    public void AbortBeforeSend()
    {
        EndFlight(answered: false);
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
        // Nothing after this line: an inline continuation may already have released the caller hold.
    }

    /// <summary>
    /// The receiver claims the response for this entry. False when the id is not this entry's
    /// current call or a response was already claimed (a duplicate): a protocol violation.
    /// </summary>
    public bool TryClaimResponse(ulong callId)
    {
        int state = Volatile.Read(ref _state);
        return callId == CallId
            && (state == StateInFlight || state == StateAbandoned)
            && Interlocked.Exchange(ref _responseClaimed, 1) == 0;
    }

    /// <summary>Completes with the response the receiver has copied into this message (after <see cref="TryClaimResponse"/>).</summary>
    public void CompleteWithResponse()
    {
        EndFlight(answered: true);
        if (Interlocked.CompareExchange(ref _state, StateCompleted, StateInFlight) == StateInFlight)
        {
            _core.SetResult(new RpcReply(this, _core.Version));
        }
        else
        {
            ReleaseUntakenPayloads(); // cancelled meanwhile: nobody will read it
        }

        DropHold();
    }

    /// <summary>Completes with a remote fault (after <see cref="TryClaimResponse"/>).</summary>
    public void CompleteWithException(Exception exception)
    {
        EndFlight(answered: true);
        ReleaseUntakenPayloads();
        if (Interlocked.CompareExchange(ref _state, StateFailed, StateInFlight) == StateInFlight)
        {
            _core.SetException(exception);
        }

        DropHold();
    }

    /// <summary>The response will never come (the connection is gone): fail a waiting call and drop the response hold, once.</summary>
    public void FailOnClose(Exception reason)
    {
        int state = Volatile.Read(ref _state);
        if (state is StateFree || Interlocked.Exchange(ref _responseClaimed, 1) != 0)
        {
            return;
        }

        EndFlight(answered: false);

        if (Interlocked.CompareExchange(ref _state, StateFailed, StateInFlight) == StateInFlight)
        {
            _core.SetException(reason);
        }

        DropHold();
    }

    public RpcReply GetResult(short token)
    {
        if (token != _core.Version)
        {
            throw new InvalidOperationException("The result of this call was already consumed.");
        }

        try
        {
            return _core.GetResult(token);
        }
        catch
        {
            ReleaseCallerHold(); // the caller has seen the outcome; there is no reply to dispose
            throw;
        }
    }

    public ValueTaskSourceStatus GetStatus(short token) => _core.GetStatus(token);

    public void OnCompleted(Action<object?> continuation, object? state, short token, ValueTaskSourceOnCompletedFlags flags) =>
        _core.OnCompleted(continuation, state, token, flags);

    /// <summary>The caller is done with the reply.</summary>
    void IReplySource.AbortConnection(ProtocolViolationException violation) =>
        Connection.Terminate(new ProtocolViolationException($"Protocol violation by peer process {Connection.Peer.ProcessId}: {violation.Message} The connection is closed.", violation));

    public void DisposeReply(short version)
    {
        if (version == _core.Version)
        {
            ReleaseCallerHold();
        }
    }

    public void ThrowIfReplyGone(short version) =>
        ObjectDisposedException.ThrowIf(version != _core.Version || Volatile.Read(ref _callerReleased) != 0, typeof(RpcReply));

    private void ReleaseCallerHold()
    {
        if (Interlocked.Exchange(ref _callerReleased, 1) != 0)
        {
            return;
        }

        // Waits for a cancellation callback running on another thread (it never waits for itself),
        // so no callback can outlive the caller hold and act on a recycled entry.
        _registration.Dispose();
        _registration = default;
        DropHold();
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
        try
        {
            ResetMessage();
        }
        finally
        {
            Inbox = null;
            Outbox = null;
            _cancellationToken = default;
            _generation = (_generation + 1) & ((1UL << (64 - IndexBits)) - 1);
            _core.Reset();
            _table.Return(this);
        }
    }

    internal void MarkFree() => Interlocked.Exchange(ref _state, StateFree);
}

/// <summary>
/// Where a reply's body and payloads live until it is disposed: a pending call of a shared-memory
/// connection, or another transport's reply. <c>version</c> tells a reply from a later one that reuses the source.
/// </summary>
internal interface IReplySource
{
    ReadOnlySpan<byte> Body { get; }

    ReadOnlyMemory<byte> BodyMemory { get; }

    int PayloadCount { get; }

    SharedBuffer TakePayload(int index);

    /// <summary>Payload <paramref name="index"/> in place, valid until the source is released (stream items only: a unary reply is gone once decoded).</summary>
    SharedBuffer LendPayload(int index) => throw new InvalidOperationException("A reply's payloads are copied or taken: it is gone once decoded.");

    /// <summary>
    /// Payload <paramref name="index"/> as the array of <typeparamref name="T"/> it was received into
    /// (<see cref="ArrayReceiver"/>), now the caller's; false when it was not (a lease holds it: copy it out).
    /// </summary>
    bool TryTakeArray<T>(int index, [System.Diagnostics.CodeAnalysis.NotNullWhen(true)] out T[]? array)
        where T : unmanaged
    {
        array = null;
        return false;
    }

    /// <summary>Throws <see cref="ObjectDisposedException"/> when the reply of <paramref name="version"/> was disposed.</summary>
    void ThrowIfReplyGone(short version);

    void DisposeReply(short version);

    /// <summary>The reply does not decode: end the connection it came on.</summary>
    void AbortConnection(ProtocolViolationException violation);
}

/// <summary>The reply to a call: its body and payloads. Dispose it to recycle the call's entry.</summary>
internal readonly struct RpcReply : IDisposable
{
    private readonly IReplySource _call;
    private readonly short _version;

    public RpcReply(IReplySource call, short version)
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

    public ReadOnlyMemory<byte> BodyMemory
    {
        get
        {
            _call.ThrowIfReplyGone(_version);
            return _call.BodyMemory;
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

    public SharedBuffer TakePayload(int index)
    {
        _call.ThrowIfReplyGone(_version);
        return _call.TakePayload(index);
    }

    public SharedBuffer LendPayload(int index)
    {
        _call.ThrowIfReplyGone(_version);
        return _call.LendPayload(index);
    }

    public bool TryTakeArray<T>(int index, [System.Diagnostics.CodeAnalysis.NotNullWhen(true)] out T[]? array)
        where T : unmanaged
    {
        _call.ThrowIfReplyGone(_version);
        return _call.TryTakeArray(index, out array);
    }

    /// <summary>The reply does not decode: end the connection it came on.</summary>
    public void AbortConnection(ProtocolViolationException violation) => _call?.AbortConnection(violation);

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
    private readonly long[] _latency = new long[LatencyClasses];
    private readonly long _fastTicks;
    private int _cursor;
    private int _waiterCount;
    private int _fastInFlight;
    private int _inFlight;
    private volatile bool _closed;

    /// <summary>Methods are told apart for the spin decision by their id modulo this (collisions only share an estimate).</summary>
    private const int LatencyClasses = 64;

    /// <param name="spinBudget">Calls whose replies usually come within this are "fast": the poller spins while one is in flight.</param>
    public PendingCallTable(RpcConnection connection, int capacity, bool runContinuationsAsynchronously, TimeSpan spinBudget)
    {
        _fastTicks = (long)(spinBudget.TotalSeconds * Stopwatch.Frequency);
        _entries = new PendingCall[capacity];
        _mask = capacity - 1;
        for (int i = 0; i < capacity; i++)
        {
            _entries[i] = new PendingCall(connection, this, i, runContinuationsAsynchronously);
        }
    }

    /// <summary>Calls sent and not answered yet.</summary>
    public int CallsInFlight => Volatile.Read(ref _inFlight);

    /// <summary>Calls in flight whose method usually answers within the spin budget.</summary>
    public int FastCallsInFlight => Volatile.Read(ref _fastInFlight);

    public static int LatencyClassOf(int methodId) => methodId & (LatencyClasses - 1);

    /// <summary>A call of <paramref name="latencyClass"/> goes out; true when it counts as fast.</summary>
    public bool EnterFlight(int latencyClass)
    {
        Interlocked.Increment(ref _inFlight);
        if (Volatile.Read(ref _latency[latencyClass]) >= _fastTicks)
        {
            return false;
        }

        Interlocked.Increment(ref _fastInFlight);
        return true;
    }

    /// <summary>
    /// A call's flight ended; <paramref name="latencyTicks"/> (negative: unanswered) moves its class's
    /// estimate, so one slow method (an offloaded copy, a long computation) never keeps the poller
    /// from spinning for the fast ones, and a method that turned slow stops being spun for.
    /// </summary>
    public void LeaveFlight(int latencyClass, long latencyTicks, bool countedFast)
    {
        Interlocked.Decrement(ref _inFlight);
        if (countedFast)
        {
            int remaining = Interlocked.Decrement(ref _fastInFlight);
            Debug.Assert(remaining >= 0, "more fast calls left the flight than entered it");
        }

        if (latencyTicks >= 0)
        {
            long estimate = Volatile.Read(ref _latency[latencyClass]);
            Volatile.Write(ref _latency[latencyClass], estimate + ((latencyTicks - estimate) / 4)); // racing updates may lose one sample: harmless
        }
    }

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
