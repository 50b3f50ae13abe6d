using System.Collections.Concurrent;
using System.Diagnostics;
using System.Threading.Tasks.Sources;

namespace OffloadRpc.Transport;

/// <summary>A condition awaited with <see cref="SharedWait.WaitAsync"/>: checked and armed by the poller (a class: it outlives the caller's frame).</summary>
internal interface IAsyncWaitCondition : IArmedWaitCondition
{
}

/// <summary>
/// One pending <see cref="SharedWait.WaitAsync"/>: a pooled <see cref="IValueTaskSource{TResult}"/> that the
/// process's poller completes (continuations on the thread pool, never on the poller).
/// </summary>
internal sealed unsafe class AsyncWait : PollSource, IValueTaskSource<bool>
{
    private static readonly ConcurrentQueue<AsyncWait> s_pool = new();

    /// <summary>How long after it starts the poller spins for a wait before it sleeps on it.</summary>
    private static readonly long SpinTicks = Stopwatch.Frequency / 20_000; // 50 us

    private ManualResetValueTaskSourceCore<bool> _core = new() { RunContinuationsAsynchronously = true };
    private IAsyncWaitCondition? _condition;
    private CancellationTokenRegistration _cancellation;
    private long _startedAt;
    private int _sleepSlice;
    private int _cancelled;
    private bool _result;

    public static ValueTask<bool> Start(IAsyncWaitCondition condition, int sleepSliceMilliseconds, CancellationToken cancellationToken)
    {
        if (!s_pool.TryDequeue(out AsyncWait? wait))
        {
            wait = new AsyncWait();
        }

        wait._condition = condition;
        wait._sleepSlice = sleepSliceMilliseconds;
        wait._startedAt = Stopwatch.GetTimestamp();
        wait._result = false;
        Volatile.Write(ref wait._cancelled, 0);
        var task = new ValueTask<bool>(wait, wait._core.Version);
        PollerGroup.Add(wait);
        if (cancellationToken.CanBeCanceled)
        {
            wait._cancellation = cancellationToken.UnsafeRegister(static state =>
            {
                var w = (AsyncWait)state!;
                Volatile.Write(ref w._cancelled, 1);
                w.Owner?.Ring();
            }, wait);
        }

        return task;
    }

    public override int SleepSliceMilliseconds => _sleepSlice;

    public override long SpinUntil(long now) => _startedAt + SpinTicks;

    public override PollResult Poll(long now)
    {
        IAsyncWaitCondition condition = _condition!;
        if (condition.IsSatisfied())
        {
            _result = true;
            return PollResult.Finished;
        }

        if (Volatile.Read(ref _cancelled) != 0 || condition.IsAbandoned())
        {
            _result = false;
            return PollResult.Finished;
        }

        return PollResult.Idle;
    }

    public override void Arm(out int* word, out int expected) => _condition!.Arm(out word, out expected);

    /// <summary>
    /// Completes the wait only now that the poller has let go of it: the continuation may recycle this
    /// object at once (and register it again), which must not happen while a poller still holds it.
    /// </summary>
    public override void OnRemoved() => _core.SetResult(_result);

    bool IValueTaskSource<bool>.GetResult(short token)
    {
        try
        {
            return _core.GetResult(token);
        }
        finally
        {
            // Dispose waits for a running cancellation callback; after it nothing refers to this wait.
            _cancellation.Dispose();
            _cancellation = default;
            _condition = null;
            Owner = null;
            ResetRemoval();
            _core.Reset();
            s_pool.Enqueue(this);
        }
    }

    ValueTaskSourceStatus IValueTaskSource<bool>.GetStatus(short token) => _core.GetStatus(token);

    void IValueTaskSource<bool>.OnCompleted(Action<object?> continuation, object? state, short token, ValueTaskSourceOnCompletedFlags flags) =>
        _core.OnCompleted(continuation, state, token, flags);
}
