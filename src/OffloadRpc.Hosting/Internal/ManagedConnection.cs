using Microsoft.Extensions.DependencyInjection;
using OffloadRpc.Internal;
using OffloadRpc.Transport;

namespace OffloadRpc.Hosting.Internal;

/// <summary>
/// The client connection to one endpoint, shared by every proxy registered for it: connects on first
/// use; when the server dies or restarts, the calls in flight fail with <see cref="PeerDisconnectedException"/>
/// and the next call connects again. A failed attempt is retried no sooner than a backoff that doubles
/// from 100 ms to 5 s (with jitter); a call made meanwhile fails at once with <see cref="PeerDisconnectedException"/>
/// (<see cref="UnauthorizedAccessException"/> when the server refused the attempt).
/// </summary>
internal sealed class ManagedConnection : IAsyncDisposable
{
    private static readonly TimeSpan FirstBackoff = TimeSpan.FromMilliseconds(100);
    private static readonly TimeSpan MaxBackoff = TimeSpan.FromSeconds(5);

    private readonly ClientRegistration _registration;
    private readonly OffloadRpcOptions _options;
    private readonly object _gate = new();
    private OffloadRpcConnection? _current;
    private Task<OffloadRpcConnection>? _connecting;
    private DateTime _nextAttempt;
    private Exception? _lastFailure;
    private int _failures;
    private bool _disposed;

    public ManagedConnection(IServiceProvider services, ClientRegistration registration)
    {
        _registration = registration;
        _options = registration.BuildOptions(services);
        ClientInterceptor[] fromServices = [.. registration.Interceptors.Select(make => make(services))];
        Invoker = new ReconnectingInvoker(this, _options.CreateSerializerOptions()) { Pipeline = ClientPipeline.From(_options, fromServices) };
    }

    public string Endpoint => _registration.Endpoint;

    /// <summary>What the proxies of this endpoint call.</summary>
    public CallInvoker Invoker { get; }

    /// <summary>The open connection, or null.</summary>
    public OffloadRpcConnection? Current => Volatile.Read(ref _current) is { IsConnected: true } current ? current : null;

    public T GetProxy<T>()
        where T : class =>
        (ServiceRegistry.Find<T>() ?? throw new InvalidOperationException($"{typeof(T).FullName} has no generated proxy: mark it [OffloadService] and reference the OffloadRpc generator.")).CreateProxy(Invoker);

    /// <summary>The open connection; connects when there is none (or waits for the attempt in progress).</summary>
    /// <exception cref="PeerDisconnectedException">Not connected and the last attempt failed less than its backoff ago.</exception>
    public async ValueTask<OffloadRpcConnection> ConnectAsync(CancellationToken cancellationToken)
    {
        if (Current is { } current)
        {
            return current;
        }

        Task<OffloadRpcConnection> attempt;
        lock (_gate)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (Current is { } raced)
            {
                return raced;
            }

            if (_connecting is null)
            {
                if (DateTime.UtcNow < _nextAttempt && _lastFailure is { } last)
                {
                    string wait = $"the next one is allowed in {(_nextAttempt - DateTime.UtcNow).TotalMilliseconds:F0} ms.";
                    throw last is UnauthorizedAccessException
                        ? new UnauthorizedAccessException($"Not connected to {Endpoint}: the last attempt was refused ({last.Message}); {wait}", last) // refused, not unreachable: as the attempt was
                        : new PeerDisconnectedException($"Not connected to {Endpoint}: the last attempt failed ({last.Message}); {wait}", last);
                }

                _connecting = ConnectOnceAsync();
            }

            attempt = _connecting;
        }

        return await attempt.WaitAsync(cancellationToken).ConfigureAwait(false);
    }

    private async Task<OffloadRpcConnection> ConnectOnceAsync()
    {
        await Task.Yield(); // run outside the lock
        OffloadRpcConnection? stale = Interlocked.Exchange(ref _current, null);
        if (stale is not null)
        {
            await stale.DisposeAsync().ConfigureAwait(false);
        }

        try
        {
            OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(Endpoint, _options).ConfigureAwait(false);
            try
            {
                foreach (Action<OffloadRpcConnection> check in _registration.Contracts)
                {
                    check(connection);
                }
            }
            catch
            {
                await connection.DisposeAsync().ConfigureAwait(false);
                throw;
            }

            lock (_gate)
            {
                _failures = 0;
                _lastFailure = null;
                _connecting = null;
                if (_disposed)
                {
                    _ = connection.DisposeAsync().AsTask();
                    throw new ObjectDisposedException(nameof(ManagedConnection));
                }

                Volatile.Write(ref _current, connection);
            }

            return connection;
        }
        catch (Exception ex) when (ex is not ObjectDisposedException)
        {
            lock (_gate)
            {
                _failures++;
                double backoff = Math.Min(MaxBackoff.TotalMilliseconds, FirstBackoff.TotalMilliseconds * Math.Pow(2, _failures - 1));
                _nextAttempt = DateTime.UtcNow + TimeSpan.FromMilliseconds(backoff * (0.8 + (0.4 * Random.Shared.NextDouble())));
                _lastFailure = ex;
                _connecting = null;
            }

            throw;
        }
    }

    public async ValueTask DisposeAsync()
    {
        Task<OffloadRpcConnection>? connecting;
        lock (_gate)
        {
            _disposed = true;
            connecting = _connecting;
        }

        if (connecting is not null)
        {
            try
            {
                await connecting.ConfigureAwait(false);
            }
            catch (Exception)
            {
            }
        }

        if (Interlocked.Exchange(ref _current, null) is { } current)
        {
            await current.DisposeAsync().ConfigureAwait(false);
        }
    }

    /// <summary>The invoker the proxies hold: each call goes over the connection of the moment.</summary>
    private sealed class ReconnectingInvoker(ManagedConnection owner, SerializerOptionsSource serializerOptions) : CallInvoker(serializerOptions)
    {
        internal override bool IsReady => owner.Current is not null;

        internal override async ValueTask WhenReadyAsync(CancellationToken cancellationToken) =>
            await owner.ConnectAsync(cancellationToken).ConfigureAwait(false);

        internal override ValueTask<RpcReply> SendAsync(MethodDescriptor method, MessageBuilder request, CancellationToken cancellationToken) =>
            Connection().Invoker.SendAsync(method, request, cancellationToken);

        internal override ValueTask<RpcReply> SendAsync(MethodDescriptor method, MessageBuilder request, in OutgoingMetadata metadata, CancellationToken cancellationToken) =>
            Connection().Invoker.SendAsync(method, request, metadata, cancellationToken);

        /// <summary>A call with nothing around it: as the connection of the moment makes it (over gRPC, in one step).</summary>
        internal override ValueTask<T> InvokeLeanAsync<T>(MethodDescriptor<T> method, MessageBuilder request, CancellationToken cancellationToken) =>
            ConnectionFor(request) is { } connection ? connection.Invoker.InvokeLeanAsync(method, request, cancellationToken) : ValueTask.FromException<T>(Disconnected());

        /// <inheritdoc cref="InvokeLeanAsync{T}"/>
        internal override ValueTask InvokeLeanAsync(MethodDescriptor method, MessageBuilder request, CancellationToken cancellationToken) =>
            ConnectionFor(request) is { } connection ? connection.Invoker.InvokeLeanAsync(method, request, cancellationToken) : ValueTask.FromException(Disconnected());

        /// <summary>The connection of the moment, or null when it closed since the readiness check: then the request is discarded (it is the call's, sent or not).</summary>
        private OffloadRpcConnection? ConnectionFor(MessageBuilder request)
        {
            if (Volatile.Read(ref owner._current) is { } connection)
            {
                return connection;
            }

            request.Discard();
            return null;
        }

        /// <summary>A streamed result: connects when enumerated, then streams as the connection of the moment does (shared memory or another transport).</summary>
        internal override IAsyncEnumerable<T> CreateServerStream<T>(MethodDescriptor<T> method, MessageBuilder request, CancellationToken cancellationToken) =>
            StreamAsync(method, request, null, cancellationToken);

        /// <summary>An observed streamed result: as above, with the context's metadata.</summary>
        internal override IAsyncEnumerable<T> CreateObservedServerStream<T>(MethodDescriptor<T> method, ClientInterceptorContext context) =>
            StreamAsync(method, context.TakeRequest(), context, context.CancellationToken);

        private async IAsyncEnumerable<T> StreamAsync<T>(MethodDescriptor<T> method, MessageBuilder request, ClientInterceptorContext? context, CancellationToken cancellationToken, [System.Runtime.CompilerServices.EnumeratorCancellation] CancellationToken enumeratorToken = default)
        {
            OffloadRpcConnection connection;
            try
            {
                connection = await owner.ConnectAsync(cancellationToken).ConfigureAwait(false);
            }
            catch
            {
                request.Discard();
                throw;
            }

            IAsyncEnumerable<T> stream = context is null
                ? connection.Invoker.CreateServerStream(method, request, cancellationToken)
                : connection.Invoker.CreateObservedServerStream(method, context.WithRequest(request));
            await foreach (T item in stream.WithCancellation(enumeratorToken).ConfigureAwait(false))
            {
                yield return item;
            }
        }

        internal override ValueTask<RpcReply> SendStreamingAsync(MethodDescriptor method, MessageBuilder request, in OutgoingMetadata metadata, out StreamInbox inbox, CancellationToken cancellationToken)
        {
            OffloadRpcConnection connection = ConnectionFor(request) ?? throw Disconnected();
            return connection.Invoker.SendStreamingAsync(method, request, metadata, out inbox, cancellationToken);
        }

        /// <summary>The connection of the moment; one that closed since the readiness check fails the call, and the next call reconnects.</summary>
        private OffloadRpcConnection Connection() =>
            Volatile.Read(ref owner._current) ?? throw Disconnected();

        private PeerDisconnectedException Disconnected() => new($"Not connected to {owner.Endpoint}.");
    }
}

/// <summary>The managed connections of this application, one per endpoint.</summary>
internal sealed class ManagedConnections(IServiceProvider services) : IAsyncDisposable
{
    private readonly Dictionary<ClientRegistration, ManagedConnection> _connections = [];

    public ManagedConnection For(ClientRegistration registration)
    {
        lock (_connections)
        {
            if (!_connections.TryGetValue(registration, out ManagedConnection? connection))
            {
                connection = new ManagedConnection(services, registration);
                _connections.Add(registration, connection);
            }

            return connection;
        }
    }

    public ManagedConnection? Find(string endpoint)
    {
        lock (_connections)
        {
            return _connections.Values.FirstOrDefault(c => c.Endpoint == endpoint);
        }
    }

    public async ValueTask DisposeAsync()
    {
        ManagedConnection[] all;
        lock (_connections)
        {
            all = [.. _connections.Values];
            _connections.Clear();
        }

        foreach (ManagedConnection connection in all)
        {
            await connection.DisposeAsync().ConfigureAwait(false);
        }
    }
}
