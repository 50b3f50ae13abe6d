using OffloadRpc.Internal;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// The slow-call log times a call on the coarse clock when its threshold is long enough for a tick of a few
/// ms not to matter (50 ms and more), on the precise one otherwise; either clock measures in milliseconds,
/// so a call that took longer than the threshold is slow.
/// </summary>
public sealed class SlowCallClockTests
{
    [Theory]
    [InlineData(0, false)] // every call is slow
    [InlineData(20, false)]
    [InlineData(49, false)]
    [InlineData(50, true)]
    [InlineData(1000, true)] // the default
    public void A_threshold_picks_its_clock(int thresholdMilliseconds, bool coarse)
    {
        var logging = new CallLogging(new Logger(), TimeSpan.FromMilliseconds(thresholdMilliseconds));
        Assert.Equal(thresholdMilliseconds, logging.SlowCallMilliseconds);
        Assert.Equal(coarse, logging.UsesCoarseClock);
    }

    [Theory]
    [InlineData(20)] // the precise clock
    [InlineData(60)] // the coarse clock
    public void A_call_longer_than_the_threshold_measures_as_slow_on_either_clock(int thresholdMilliseconds)
    {
        var logging = new CallLogging(new Logger(), TimeSpan.FromMilliseconds(thresholdMilliseconds));
        long started = logging.Now();
        Thread.Sleep(thresholdMilliseconds + 100); // at least that long, whatever the load: far more than a coarse tick over the threshold
        double elapsed = logging.ElapsedMilliseconds(started);
        Assert.True(elapsed >= thresholdMilliseconds, $"{elapsed} ms measured for a call of at least {thresholdMilliseconds + 100} ms");
        Assert.True(elapsed < 60_000, $"{elapsed} ms: not milliseconds"); // microseconds or ticks of any clock would be far more
    }

    [Fact]
    public void The_null_logger_times_nothing() =>
        Assert.Equal(double.PositiveInfinity, new CallLogging(Microsoft.Extensions.Logging.Abstractions.NullLogger.Instance, TimeSpan.Zero).SlowCallMilliseconds);

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
