using OffloadRpc.Internal;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// The slow-call log times a call on the coarse clock when its threshold is long enough for a tick of a few
/// ms not to matter, on the precise one otherwise; either way a call that took longer than the threshold is
/// measured as slow, and one that took no time as not.
/// </summary>
public sealed class SlowCallClockTests
{
    [Theory]
    [InlineData(0)] // the precise clock: every call is slow
    [InlineData(20)] // the precise clock
    [InlineData(60)] // the coarse clock
    [InlineData(300_000)] // the coarse clock, the library's kind of threshold (one second by default)
    public void A_call_is_timed_on_the_clock_of_its_threshold(int thresholdMilliseconds)
    {
        var logging = new CallLogging(new Logger(), TimeSpan.FromMilliseconds(thresholdMilliseconds));
        Assert.Equal(thresholdMilliseconds, logging.SlowCallMilliseconds);

        long started = logging.Now();
        Assert.InRange(logging.ElapsedMilliseconds(started), 0, thresholdMilliseconds < 1000 ? double.MaxValue : thresholdMilliseconds - 1); // never negative; no time is not five minutes

        if (thresholdMilliseconds < 1000)
        {
            started = logging.Now();
            Thread.Sleep(thresholdMilliseconds + 100); // at least that long, whatever the machine's load: more than a tick over the threshold
            Assert.True(logging.ElapsedMilliseconds(started) >= thresholdMilliseconds, "a call longer than the threshold is slow");
        }
    }

    /// <summary>A logger other than the null one (with the null logger no call is ever slow).</summary>
    private sealed class Logger : Microsoft.Extensions.Logging.ILogger
    {
        public IDisposable? BeginScope<TState>(TState state)
            where TState : notnull => null;

        public bool IsEnabled(Microsoft.Extensions.Logging.LogLevel logLevel) => true;

        public void Log<TState>(Microsoft.Extensions.Logging.LogLevel logLevel, Microsoft.Extensions.Logging.EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
        {
        }
    }
}
