using System.Diagnostics;

namespace OffloadRpc.Transport;

/// <summary>
/// When the poller should spin for a connection rather than sleep: only while the peer is actively
/// sending (its messages come closer together than the spin budget, so spinning catches the next one
/// without a ~40-150 us futex wake), or while calls are in flight whose replies usually come within the
/// budget. An idle connection, or one whose calls are all slow, is slept on at once.
/// </summary>
internal sealed class SpinPolicy
{
    private readonly long _budgetTicks;
    private long _lastArrival;
    private long _gapEstimate;
    private long _lastSend;

    public SpinPolicy(TimeSpan budget)
    {
        _budgetTicks = budget <= TimeSpan.Zero ? 0 : (long)(budget.TotalSeconds * Stopwatch.Frequency);
        _gapEstimate = 2 * _budgetTicks; // no evidence of an active peer yet
    }

    public long BudgetTicks => _budgetTicks;

    /// <summary>The smoothed time between arrivals (ticks, at most twice the budget).</summary>
    public long GapEstimate => Volatile.Read(ref _gapEstimate);

    /// <summary>Messages arrived at <paramref name="now"/> (poller thread only).</summary>
    public void OnArrival(long now)
    {
        // A gap is capped at twice the budget: after an idle minute a peer that calls back to back again
        // is recognised as active within a few calls.
        long gap = Math.Min(now - _lastArrival, 2 * _budgetTicks);
        long estimate = _gapEstimate + ((gap - _gapEstimate) / 8);
        Volatile.Write(ref _gapEstimate, estimate);
        Volatile.Write(ref _lastArrival, now);
    }

    /// <summary>A request went out at <paramref name="now"/> (any thread).</summary>
    public void OnSend(long now) => Volatile.Write(ref _lastSend, now);

    /// <summary>Until when the poller should spin for this connection (0: it may sleep now).</summary>
    public long SpinUntil(long now, int fastCallsInFlight)
    {
        if (_budgetTicks == 0)
        {
            return 0;
        }

        long lastArrival = Volatile.Read(ref _lastArrival);
        long until = Volatile.Read(ref _gapEstimate) < _budgetTicks ? lastArrival + _budgetTicks : 0;
        if (fastCallsInFlight > 0)
        {
            until = Math.Max(until, Math.Max(lastArrival, Volatile.Read(ref _lastSend)) + _budgetTicks);
        }

        return until;
    }
}
