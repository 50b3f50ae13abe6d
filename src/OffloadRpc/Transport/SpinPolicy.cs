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
    /// <summary>The shortest spin after an arrival: a peer's usual gap of one microsecond says little about the next.</summary>
    private static readonly long MinimumWindowTicks = Stopwatch.Frequency / 50_000; // 20 us

    private readonly long _budgetTicks;
    private long _lastArrival;
    private long _gapEstimate;
    private long _lastSend;
    private int _shortSleeps;

    /// <summary>
    /// What a wake-up itself may take on a VM: a sleep that ended within the budget plus this would have
    /// been caught by spinning (waking an idle vCPU takes 100-200 us there).
    /// </summary>
    private static readonly long WakeAllowanceTicks = Stopwatch.Frequency / 4000; // 250 us

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

    /// <summary>Whether the peer is calling back to back right now (its messages come within the spin budget of each other, the last one lately).</summary>
    public bool IsPeerActive(long now) =>
        _budgetTicks != 0 && Volatile.Read(ref _gapEstimate) < _budgetTicks && now - Volatile.Read(ref _lastArrival) < 20 * _budgetTicks;

    /// <summary>
    /// The poller slept on this connection and its word woke it after <paramref name="sleptTicks"/>. A
    /// short sleep means spinning would have caught the message without the wake-up (whatever the usual
    /// gaps say: their estimate includes the wake-ups themselves); long ones mean the peer is quiet.
    /// </summary>
    public void OnWoken(long sleptTicks)
    {
        int credit = Volatile.Read(ref _shortSleeps);
        Volatile.Write(ref _shortSleeps, sleptTicks <= _budgetTicks + WakeAllowanceTicks ? 4 : credit / 2);
    }

    /// <summary>A request went out at <paramref name="now"/> (any thread).</summary>
    public void OnSend(long now) => Volatile.Write(ref _lastSend, now);

    /// <summary>Until when the poller should spin for this connection (0: it may sleep now).</summary>
    /// <param name="fastCallsInFlight">Calls in flight of methods that usually answer within the budget.</param>
    /// <param name="callsInFlight">All calls in flight (spun for too while recent sleeps on them were short).</param>
    public long SpinUntil(long now, int fastCallsInFlight, int callsInFlight)
    {
        if (_budgetTicks == 0)
        {
            return 0;
        }

        // While the peer calls actively, spin a few of its usual gaps past its last message (a short stall
        // of the peer is not a reason to sleep), never more than the budget.
        long lastArrival = Volatile.Read(ref _lastArrival);
        long gap = Volatile.Read(ref _gapEstimate);
        bool shortSleeps = Volatile.Read(ref _shortSleeps) > 0;
        long until = gap < _budgetTicks ? lastArrival + Math.Min(_budgetTicks, Math.Max(4 * gap, MinimumWindowTicks))
            : shortSleeps ? lastArrival + _budgetTicks
            : 0;
        if (fastCallsInFlight > 0 || (callsInFlight > 0 && shortSleeps))
        {
            until = Math.Max(until, Math.Max(lastArrival, Volatile.Read(ref _lastSend)) + _budgetTicks);
        }

        return until;
    }
}
