using System.Collections.Concurrent;

namespace OffloadRpc.Tests.Infrastructure;

/// <summary>
/// One thread that runs everything posted to its <see cref="SynchronizationContext"/>, like a UI
/// thread: code that blocks it while waiting for one of its own continuations deadlocks.
/// </summary>
internal sealed class SingleThreadContext : IDisposable
{
    private readonly BlockingCollection<(SendOrPostCallback Callback, object? State)> _queue = new();
    private readonly Thread _thread;

    public SingleThreadContext()
    {
        _thread = new Thread(Pump) { IsBackground = true, Name = "single-threaded context" };
        _thread.Start();
    }

    /// <summary>Starts <paramref name="start"/> on the context's thread; the task completes when the work does.</summary>
    public Task<T> Run<T>(Func<Task<T>> start)
    {
        var result = new TaskCompletionSource<T>(TaskCreationOptions.RunContinuationsAsynchronously);
        _queue.Add((_ => Start(), null));
        return result.Task;

        async void Start()
        {
            try
            {
                result.TrySetResult(await start());
            }
            catch (Exception exception)
            {
                result.TrySetException(exception);
            }
        }
    }

    public void Dispose()
    {
        _queue.CompleteAdding();
        _thread.Join(TimeSpan.FromSeconds(10));
        _queue.Dispose();
    }

    private void Pump()
    {
        SynchronizationContext.SetSynchronizationContext(new Context(this));
        foreach ((SendOrPostCallback callback, object? state) in _queue.GetConsumingEnumerable())
        {
            callback(state);
        }
    }

    /// <summary>The context of the pump thread: every post runs there, in order.</summary>
    internal sealed class Context(SingleThreadContext owner) : SynchronizationContext
    {
        public override void Post(SendOrPostCallback d, object? state)
        {
            if (!owner._queue.IsAddingCompleted)
            {
                owner._queue.Add((d, state));
            }
        }

        public override void Send(SendOrPostCallback d, object? state) => throw new NotSupportedException("Send would block the caller on the pump thread.");

        public override SynchronizationContext CreateCopy() => this;
    }
}
