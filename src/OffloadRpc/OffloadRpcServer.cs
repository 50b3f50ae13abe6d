using OffloadRpc.Internal;
using OffloadRpc.Transport;

namespace OffloadRpc;

/// <summary>
/// Serves registered service implementations to client processes over shared memory. Register every
/// service, then <see cref="StartAsync"/>; each client gets its own connection, and one client's
/// failure or death never affects the others.
/// </summary>
public sealed class OffloadRpcServer : IAsyncDisposable
{
    private readonly string _endpoint;
    private readonly OffloadRpcOptions _options;
    private readonly ServiceDispatcher _dispatcher;
    private RpcListener? _listener;
    private Microsoft.Extensions.Logging.ILogger _logger = Microsoft.Extensions.Logging.Abstractions.NullLogger.Instance;
    private volatile bool _stopped;
    private TaskCompletionSource? _drained; // set while StopAsync waits for the calls in flight

    /// <param name="endpoint">An endpoint name (its socket lives in the per-user directory) or a socket path (with a '/').</param>
    public OffloadRpcServer(string endpoint, OffloadRpcOptions? options = null)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(endpoint);
        _endpoint = endpoint;
        _options = options ?? new OffloadRpcOptions();
        _dispatcher = new ServiceDispatcher(_options.CreateSerializerOptions());
    }

    /// <summary>Routes calls of every transport (shared memory, gRPC) to the registered stubs.</summary>
    internal ServiceDispatcher Dispatcher => _dispatcher;

    internal OffloadRpcOptions Options => _options;

    private Transport.LeaseBudget? _requestBudget;

    /// <summary>What the gRPC requests in flight hold in this process (<see cref="OffloadRpcOptions.MaxBufferedRequestBytes"/>), shared by every method served over gRPC (read per call: no delegate made once it exists).</summary>
    internal Transport.LeaseBudget RequestBudget => Volatile.Read(ref _requestBudget) ?? MakeRequestBudget();

    private Transport.LeaseBudget MakeRequestBudget()
    {
        var made = new Transport.LeaseBudget(Math.Max(0, _options.MaxBufferedRequestBytes));
        return Interlocked.CompareExchange(ref _requestBudget, made, null) ?? made; // another thread's, or ours
    }

    /// <summary>The socket path clients connect to (known once started).</summary>
    public string? SocketPath => _listener?.SocketPath;

    /// <summary>How many clients are connected now.</summary>
    public int ConnectionCount => _listener?.Connections.Count ?? 0;

    /// <summary>A client was refused (uid, protocol version, contract) or broke the protocol; the server goes on.</summary>
    public event Action<Exception>? ConnectionFailed;

    /// <summary>Serves <paramref name="implementation"/> as service <typeparamref name="T"/>. Before <see cref="StartAsync"/>.</summary>
    public void Register<T>(T implementation)
        where T : class
    {
        ArgumentNullException.ThrowIfNull(implementation);
        if (_listener is not null)
        {
            throw new InvalidOperationException("Register services before StartAsync.");
        }

        ServiceDescriptor<T> descriptor = ServiceRegistry.Find<T>()
            ?? throw new InvalidOperationException(typeof(T).IsInterface
                ? $"{typeof(T).FullName} has no generated stub: mark it [OffloadService] and reference the OffloadRpc generator."
                : $"{typeof(T).FullName} is not a service interface: call Register<IYourService>(implementation) with the [OffloadService] interface as the type argument.");
        _dispatcher.Add(descriptor, descriptor.CreateStub(implementation));
    }

    /// <summary>
    /// Serves service <typeparamref name="T"/> with an implementation made for each call by
    /// <paramref name="factory"/> (after the interceptors ran), as gRPC activates a service per call;
    /// the hosting package resolves it from a DI scope per call. Before <see cref="StartAsync"/>.
    /// </summary>
    public void Register<T>(Func<ServerInterceptorContext, T> factory)
        where T : class
    {
        ArgumentNullException.ThrowIfNull(factory);
        if (_listener is not null)
        {
            throw new InvalidOperationException("Register services before StartAsync.");
        }

        ServiceDescriptor<T> descriptor = ServiceRegistry.Find<T>()
            ?? throw new InvalidOperationException($"{typeof(T).FullName} has no generated stub: mark it [OffloadService] and reference the OffloadRpc generator.");
        _dispatcher.Add(descriptor, descriptor.CreatePerCallStub(), context => factory(context));
    }

    /// <summary>Requests being served now, on every connection.</summary>
    public int CallsInFlight => _listener?.ServedCallsInFlight ?? 0;

    /// <summary>Whether the server is listening for new clients.</summary>
    public bool IsListening => _listener is not null && !_stopped;

    /// <summary>Starts listening. Returns once clients can connect.</summary>
    public Task StartAsync(CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        if (_listener is not null)
        {
            throw new InvalidOperationException("The server is already started.");
        }

        TransportOptions transportOptions = _options.ToTransportOptions();
        _logger = transportOptions.Logger;
        _dispatcher.Pipeline = ServerPipeline.From(_options);
        var listener = new RpcListener(_endpoint, transportOptions, _dispatcher.Contracts, _ => _dispatcher);
        listener.ConnectionFailed += ex => ConnectionFailed?.Invoke(ex);
        listener.ServedCallsDrained = OnServedCallsDrained;
        listener.Start();
        _listener = listener;
        return Task.CompletedTask;
    }

    /// <summary>
    /// Stops gracefully: no new clients are accepted (the socket file goes), calls in flight may finish
    /// until <paramref name="cancellationToken"/> fires; then every connection closes, which cancels the
    /// calls still running (their tokens fire; their callers get <see cref="PeerDisconnectedException"/>).
    /// </summary>
    public async Task StopAsync(CancellationToken cancellationToken = default)
    {
        RpcListener? listener = _listener;
        if (listener is null || _stopped)
        {
            return;
        }

        _stopped = true;
        await listener.StopAcceptingAsync().ConfigureAwait(false);
        Diagnostics.Log.ServerStopping(_logger, listener.SocketPath, listener.ServedCallsInFlight);
        await DrainAsync(listener, cancellationToken).ConfigureAwait(false);
        int left = listener.ServedCallsInFlight;
        if (left > 0)
        {
            Diagnostics.Log.ServerCancellingCalls(_logger, listener.SocketPath, left);
        }

        await listener.DisposeAsync().ConfigureAwait(false);
    }

    /// <summary>
    /// Returns when no call is being served any more, or when <paramref name="cancellationToken"/> fires. Each
    /// time a connection's calls drop to none (or a connection goes) the waiter is woken and the total read again.
    /// </summary>
    private async Task DrainAsync(RpcListener listener, CancellationToken cancellationToken)
    {
        while (!cancellationToken.IsCancellationRequested)
        {
            var waiter = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);

            // A full fence before the count is read: a call that finishes after the read sees this waiter.
            Interlocked.Exchange(ref _drained, waiter);
            if (listener.ServedCallsInFlight == 0)
            {
                return;
            }

            try
            {
                await waiter.Task.WaitAsync(cancellationToken).ConfigureAwait(false);
            }
            catch (OperationCanceledException) when (cancellationToken.IsCancellationRequested)
            {
                return;
            }
        }
    }

    private void OnServedCallsDrained() => Volatile.Read(ref _drained)?.TrySetResult();

    /// <summary>Stops listening, closes every connection and removes the socket file.</summary>
    public ValueTask DisposeAsync()
    {
        _stopped = true;
        return _listener?.DisposeAsync() ?? ValueTask.CompletedTask;
    }
}
