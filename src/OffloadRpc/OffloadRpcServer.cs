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

    /// <param name="endpoint">An endpoint name (its socket lives in the per-user directory) or a socket path (with a '/').</param>
    public OffloadRpcServer(string endpoint, OffloadRpcOptions? options = null)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(endpoint);
        _endpoint = endpoint;
        _options = options ?? new OffloadRpcOptions();
        _dispatcher = new ServiceDispatcher(_options.CreateSerializerOptions());
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

    /// <summary>Starts listening. Returns once clients can connect.</summary>
    public Task StartAsync(CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        if (_listener is not null)
        {
            throw new InvalidOperationException("The server is already started.");
        }

        var listener = new RpcListener(_endpoint, _options.ToTransportOptions(), _dispatcher.Contracts, _ => _dispatcher);
        listener.ConnectionFailed += ex => ConnectionFailed?.Invoke(ex);
        listener.Start();
        _listener = listener;
        return Task.CompletedTask;
    }

    /// <summary>Stops listening, closes every connection and removes the socket file.</summary>
    public ValueTask DisposeAsync() => _listener?.DisposeAsync() ?? ValueTask.CompletedTask;
}
