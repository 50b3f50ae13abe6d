using System.Diagnostics;
using OffloadRpc.Transport;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>The spin budget's rule: sleeps that a longer spin would have saved grow it; idle sleeps shrink it.</summary>
public sealed class AdaptiveSpinTests
{
    private static long Ticks(double microseconds) => (long)(microseconds * Stopwatch.Frequency / 1e6);

    [Fact]
    public void Sleeps_that_were_mostly_the_wake_up_itself_grow_the_budget_back()
    {
        var spin = new AdaptiveSpin(TimeSpan.FromMicroseconds(50));
        for (int i = 0; i < 10; i++)
        {
            spin.OnBlocked(Ticks(200_000)); // idle: a 200 ms sleep slice each time
        }

        long minimum = spin.BudgetTicks;
        Assert.True(minimum < Ticks(50) / 8, $"idle sleeps should shrink the budget, it is {minimum} ticks");

        // Calls every ~20 us with a VM wake-up of ~150-250 us each: the event came soon, the wake was slow.
        for (int i = 0; i < 5; i++)
        {
            spin.OnBlocked(Ticks(230));
        }

        Assert.Equal(Ticks(50), spin.BudgetTicks);
    }

    [Fact]
    public void Sleeps_longer_than_a_wake_up_can_explain_shrink_the_budget()
    {
        var spin = new AdaptiveSpin(TimeSpan.FromMicroseconds(50));
        spin.OnBlocked(Ticks(3_000)); // a producer writing 64 MiB between calls: spinning through it would burn a core
        Assert.InRange(spin.BudgetTicks, Ticks(25) - 1, Ticks(25) + 1);

        // Just past four budgets plus the largest wake-up allowed for (450 us): a quiet peer, not a slow wake.
        var quiet = new AdaptiveSpin(TimeSpan.FromMicroseconds(50));
        quiet.OnBlocked(Ticks(600));
        Assert.InRange(quiet.BudgetTicks, Ticks(25) - 1, Ticks(25) + 1);
    }

    [Fact]
    public void A_zero_budget_never_spins_whatever_the_sleeps()
    {
        var spin = new AdaptiveSpin(TimeSpan.Zero);
        spin.OnBlocked(Ticks(10));
        spin.OnBlocked(Ticks(10_000));
        Assert.Equal(0, spin.BudgetTicks);
    }
}
