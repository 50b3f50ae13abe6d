using System.Collections.Concurrent;
using Microsoft.Extensions.Logging;

namespace OffloadRpc.Tests.Infrastructure;

/// <summary>An ILoggerFactory that keeps every entry (level, event name, message) for the tests to read.</summary>
internal sealed class CollectingLoggerFactory : ILoggerFactory
{
    public ConcurrentQueue<(LogLevel Level, string EventName, string Message)> Entries { get; } = new();

    public ILogger CreateLogger(string categoryName) => new Logger(this);

    public void AddProvider(ILoggerProvider provider)
    {
    }

    public void Dispose()
    {
    }

    public bool Has(string eventName, string? containing = null) =>
        Entries.Any(e => e.EventName == eventName && (containing is null || e.Message.Contains(containing, StringComparison.Ordinal)));

    private sealed class Logger(CollectingLoggerFactory owner) : ILogger
    {
        public IDisposable? BeginScope<TState>(TState state)
            where TState : notnull => null;

        public bool IsEnabled(LogLevel logLevel) => true;

        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter) =>
            owner.Entries.Enqueue((logLevel, eventId.Name ?? eventId.Id.ToString(), formatter(state, exception)));
    }
}
