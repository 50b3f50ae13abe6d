using System.Diagnostics;

namespace OffloadRpc.Transport;

/// <summary>
/// How many threads of this process may spin at once. A spinning thread holds a core; with more
/// spinners than cores, spinners take the core the peer (or another caller) needs to make progress,
/// and every hand-off turns into a time slice or a futex wake. So a thread spins only when it gets a
/// place here (at most one core fewer than the process may use, at least one); otherwise it sleeps at
/// once. Spinners also yield the core every few microseconds, which costs nothing when no other thread
/// is runnable and lets one run when there is.
/// </summary>
internal static class SpinGate
{
    private static int s_spinning;

    /// <summary>The most threads of this process that spin at the same time.</summary>
    public static int Limit { get; } = Math.Max(1, Environment.ProcessorCount - 1);

    /// <summary>How often a spinner offers its core to another runnable thread (sched_yield).</summary>
    public static long YieldIntervalTicks { get; } = Math.Max(1, Stopwatch.Frequency / 200_000); // 5 us

    /// <summary>Threads spinning right now.</summary>
    public static int Spinning => Volatile.Read(ref s_spinning);

    /// <summary>Takes a place to spin; false when <see cref="Limit"/> threads already spin.</summary>
    public static bool TryEnter()
    {
        int current = Volatile.Read(ref s_spinning);
        while (current < Limit)
        {
            int seen = Interlocked.CompareExchange(ref s_spinning, current + 1, current);
            if (seen == current)
            {
                return true;
            }

            current = seen;
        }

        return false;
    }

    /// <summary>Gives the place back.</summary>
    public static void Exit()
    {
        int remaining = Interlocked.Decrement(ref s_spinning);
        Debug.Assert(remaining >= 0, "SpinGate.Exit without a matching TryEnter");
    }

    /// <summary>Offers the core to another runnable thread of any process (returns at once when there is none).</summary>
    public static void YieldCore() => Thread.Yield();
}
