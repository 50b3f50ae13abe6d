using System.Diagnostics;
using OffloadRpc.Interop;

namespace OffloadRpc.Transport;

/// <summary>A condition a <see cref="SharedWait"/> waits for, and the one that ends the wait unsatisfied.</summary>
internal interface IWaitCondition
{
    bool IsSatisfied();

    /// <summary>The wait is pointless now (connection closed, call cancelled).</summary>
    bool IsAbandoned();
}

/// <summary>
/// Spins for a bounded, adaptive budget, then sleeps on a futex word in shared memory.
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
    /// How long one futex sleep lasts before the waiter re-checks for abandonment (a safety net: close
    /// wakes waiters explicitly). The lost-wake-up stress test sets it to -1 (sleep until woken), so
    /// that a lost wake-up would hang instead of being hidden by the re-check.
    /// </summary>
    public static int SleepSliceMilliseconds { get; set; } = 200;

    /// <summary>Waits until <paramref name="condition"/> holds (true) or is abandoned (false).</summary>
    /// <param name="singleWaiter">Only one thread ever waits on <paramref name="word"/>, so it may clear it itself.</param>
    public static bool Wait<TCondition>(ref TCondition condition, int* word, AdaptiveSpin spin, bool singleWaiter)
        where TCondition : struct, IWaitCondition
    {
        if (condition.IsSatisfied())
        {
            return true;
        }

        long budget = spin.BudgetTicks;
        if (budget > 0)
        {
            long start = Stopwatch.GetTimestamp();
            int iteration = 0;
            while (true)
            {
                if (condition.IsSatisfied())
                {
                    return true;
                }

                if ((++iteration & 31) == 0)
                {
                    if (condition.IsAbandoned())
                    {
                        return false;
                    }

                    if (Stopwatch.GetTimestamp() - start > budget)
                    {
                        break;
                    }
                }

                Thread.SpinWait(1);
            }
        }

        while (true)
        {
            Interlocked.Exchange(ref *word, 1);
            if (condition.IsSatisfied())
            {
                if (singleWaiter)
                {
                    Volatile.Write(ref *word, 0);
                }

                return true;
            }

            if (condition.IsAbandoned())
            {
                return false;
            }

            long sleptAt = Stopwatch.GetTimestamp();
            LinuxNative.FutexWait(word, 1, SleepSliceMilliseconds);
            spin.OnBlocked(Stopwatch.GetTimestamp() - sleptAt);
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
