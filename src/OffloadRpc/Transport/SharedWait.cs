using System.Diagnostics;
using OffloadRpc.Interop;

namespace OffloadRpc.Transport;

/// <summary>A condition a <see cref="SharedWait"/> waits for, and the one that ends the wait unsatisfied.</summary>
internal interface IWaitCondition
{
    bool IsSatisfied();

    /// <summary>The wait is pointless now (connection closed, call cancelled, timed out).</summary>
    bool IsAbandoned();
}

/// <summary>A condition that arms its own futex word, for a protocol other than "store 1, sleep while it is 1".</summary>
internal unsafe interface IArmedWaitCondition : IWaitCondition
{
    /// <summary>
    /// Publishes that a waiter sleeps (with a full fence, before <see cref="IWaitCondition.IsSatisfied"/>
    /// is checked again) and names the futex word and the value it holds while nothing changed.
    /// </summary>
    void Arm(out int* word, out int expected);
}

/// <summary>
/// The one wait primitive: spin for a bounded, adaptive budget (only while this process has a core to
/// spare, see <see cref="SpinGate"/>), then sleep on a futex word. <see cref="Wait{TCondition}"/> blocks
/// the calling thread; <see cref="WaitAsync"/> parks nothing but a registration with the process's
/// <see cref="Poller"/>, which sleeps on many words at once.
/// <para>
/// No lost wake-ups: a waiter stores 1 into the word with a full fence and only then re-checks its
/// condition; a waker makes the condition true with a full fence and only then reads the word.
/// One of the two always sees the other's store (Dekker), so either the waiter sees the condition
/// or the waker sees the 1 and wakes it; FUTEX_WAIT re-checks the word in the kernel.
/// </para>
/// </summary>
internal static unsafe class SharedWait
{
    /// <summary>
    /// How long one futex sleep lasts by default before the waiter re-checks for abandonment (a safety
    /// net: close and cancellation wake waiters explicitly). -1: sleep until woken (the lost-wake-up
    /// tests use it, so that a lost wake-up would hang instead of being hidden by the re-check).
    /// </summary>
    public const int DefaultSleepSliceMilliseconds = 200;

    /// <summary>Waits until <paramref name="condition"/> holds (true) or is abandoned (false), sleeping on <paramref name="word"/>.</summary>
    /// <param name="singleWaiter">Only one thread ever waits on <paramref name="word"/>, so it may clear it itself.</param>
    /// <param name="sleepSliceMilliseconds">The longest single futex sleep; -1: until woken.</param>
    public static bool Wait<TCondition>(ref TCondition condition, int* word, AdaptiveSpin spin, bool singleWaiter, int sleepSliceMilliseconds = DefaultSleepSliceMilliseconds)
        where TCondition : struct, IWaitCondition
    {
        var armed = new FlagArmed<TCondition>(condition, word, singleWaiter);
        bool satisfied = Wait(ref armed, spin, sleepSliceMilliseconds);
        condition = armed.Condition; // a condition may keep state (a deadline, progress seen)
        return satisfied;
    }

    /// <summary>Waits until <paramref name="condition"/> holds (true) or is abandoned (false), sleeping on the word it arms.</summary>
    public static bool Wait<TCondition>(ref TCondition condition, AdaptiveSpin spin, int sleepSliceMilliseconds)
        where TCondition : struct, IArmedWaitCondition
    {
        if (condition.IsSatisfied())
        {
            return true;
        }

        return Spin(ref condition, spin.BudgetTicks) switch
        {
            SpinOutcome.Satisfied => true,
            SpinOutcome.Abandoned => false,
            _ => Sleep(ref condition, spin, sleepSliceMilliseconds),
        };
    }

    /// <summary>The second half of a wait, after the spin: sleeps on the word the condition arms until it holds or is abandoned.</summary>
    public static bool Sleep<TCondition>(ref TCondition condition, AdaptiveSpin spin, int sleepSliceMilliseconds)
        where TCondition : struct, IArmedWaitCondition
    {
        while (true)
        {
            condition.Arm(out int* word, out int expected);
            if (condition.IsSatisfied())
            {
                return true;
            }

            if (condition.IsAbandoned())
            {
                return false;
            }

            long sleptAt = Stopwatch.GetTimestamp();
            LinuxNative.FutexWait(word, expected, sleepSliceMilliseconds);
            spin.OnBlocked(Stopwatch.GetTimestamp() - sleptAt);
        }
    }

    /// <summary>The common protocol: a waiter stores 1 into the word and sleeps while it holds 1; a waker clears it and wakes.</summary>
    internal struct FlagArmed<TCondition> : IArmedWaitCondition
        where TCondition : struct, IWaitCondition
    {
        public TCondition Condition;
        private readonly int* _word;
        private readonly bool _singleWaiter;
        private bool _armed;

        public FlagArmed(TCondition condition, int* word, bool singleWaiter)
        {
            Condition = condition;
            _word = word;
            _singleWaiter = singleWaiter;
        }

        public bool IsSatisfied()
        {
            if (!Condition.IsSatisfied())
            {
                return false;
            }

            if (_armed && _singleWaiter)
            {
                Volatile.Write(ref *_word, 0); // nobody else sleeps here: spare the waker its syscall
            }

            return true;
        }

        public bool IsAbandoned() => Condition.IsAbandoned();

        public void Arm(out int* word, out int expected)
        {
            _armed = true;
            Interlocked.Exchange(ref *_word, 1);
            word = _word;
            expected = 1;
        }
    }

    /// <summary>
    /// Waits without a thread: the condition is checked at once, then by the process's poller, which
    /// sleeps on <paramref name="word"/> (with <paramref name="expected"/>, armed by the condition) and
    /// every other registered word at once. Completes with true when the condition holds, false when it
    /// is abandoned; continuations run on the thread pool.
    /// </summary>
    /// <param name="word">The futex word; it must stay mapped until the returned task completes.</param>
    public static ValueTask<bool> WaitAsync(IAsyncWaitCondition condition, int sleepSliceMilliseconds = DefaultSleepSliceMilliseconds, CancellationToken cancellationToken = default)
    {
        if (condition.IsSatisfied())
        {
            return new ValueTask<bool>(true);
        }

        if (condition.IsAbandoned())
        {
            return new ValueTask<bool>(false);
        }

        return AsyncWait.Start(condition, sleepSliceMilliseconds, cancellationToken);
    }

    internal enum SpinOutcome
    {
        Satisfied,
        Abandoned,
        BudgetSpent,
    }

    /// <summary>
    /// The one spin loop: polls <paramref name="condition"/> until it holds, is abandoned, or the budget
    /// is spent; only while <see cref="SpinGate"/> admits this thread, and yielding the core now and then
    /// so that a runnable thread that needs it (the peer, another caller) is not starved by our spin.
    /// </summary>
    public static SpinOutcome Spin<TCondition>(ref TCondition condition, long budgetTicks)
        where TCondition : struct, IWaitCondition
    {
        if (budgetTicks <= 0 || !SpinGate.TryEnter())
        {
            return SpinOutcome.BudgetSpent;
        }

        try
        {
            long start = Stopwatch.GetTimestamp();
            long nextYield = start + SpinGate.YieldIntervalTicks;
            int iteration = 0;
            while (true)
            {
                if (condition.IsSatisfied())
                {
                    return SpinOutcome.Satisfied;
                }

                if ((++iteration & 31) == 0)
                {
                    if (condition.IsAbandoned())
                    {
                        return SpinOutcome.Abandoned;
                    }

                    long now = Stopwatch.GetTimestamp();
                    if (now - start > budgetTicks)
                    {
                        return SpinOutcome.BudgetSpent;
                    }

                    if (now >= nextYield)
                    {
                        SpinGate.YieldCore();
                        nextYield = now + SpinGate.YieldIntervalTicks;
                    }
                }

                Thread.SpinWait(1);
            }
        }
        finally
        {
            SpinGate.Exit();
        }
    }

    /// <summary>Wakes every waiter on <paramref name="word"/>. Call after a full fence that published the condition.</summary>
    public static void Wake(int* word)
    {
        if (Volatile.Read(ref *word) != 0 && Interlocked.Exchange(ref *word, 0) != 0)
        {
            LinuxNative.FutexWake(word, int.MaxValue);
        }
    }

    /// <summary>Wakes waiters whether or not they flagged themselves (used on close).</summary>
    public static void WakeUnconditionally(int* word)
    {
        Volatile.Write(ref *word, 0);
        LinuxNative.FutexWake(word, int.MaxValue);
    }
}

/// <summary>
/// The spin budget of one waiter. It grows when a futex sleep ended soon after it began (spinning a
/// little longer would have caught the event without the ~20-40 us cost of a blocking wake) and
/// shrinks when sleeps are long (the peer is idle; spinning only burns a core).
/// </summary>
internal sealed class AdaptiveSpin
{
    /// <summary>
    /// What a wake-up itself may take: a sleep that ends within this much (plus four budgets) counts
    /// as short. On a VM, waking a futex sleeper whose vCPU went idle takes 100-200 us; without the
    /// allowance such sleeps read as "the peer is idle", the budget shrank to its minimum and stayed
    /// there, and every call paid a wake-up (1 MiB calls of 35 us took 165 us). Not more: a peer that
    /// is quiet for longer than a wake-up explains should not keep a waiter spinning its full budget.
    /// </summary>
    private static readonly long WakeAllowanceTicks = Stopwatch.Frequency / 4000; // 250 us

    private readonly long _maxTicks;
    private readonly long _minTicks;
    private long _budgetTicks;

    public AdaptiveSpin(TimeSpan maxBudget)
    {
        _maxTicks = maxBudget <= TimeSpan.Zero ? 0 : (long)(maxBudget.TotalSeconds * Stopwatch.Frequency);
        _minTicks = _maxTicks == 0 ? 0 : Math.Max(1, _maxTicks / 16);
        _budgetTicks = _maxTicks;
    }

    public long BudgetTicks => Volatile.Read(ref _budgetTicks);

    public void OnBlocked(long blockedTicks)
    {
        if (_maxTicks == 0)
        {
            return;
        }

        long budget = Volatile.Read(ref _budgetTicks);
        long next = blockedTicks <= (_maxTicks * 4) + WakeAllowanceTicks
            ? Math.Min(_maxTicks, budget * 2)
            : Math.Max(_minTicks, budget / 2);
        Volatile.Write(ref _budgetTicks, next);
    }
}
