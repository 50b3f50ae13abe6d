using System.Collections.Concurrent;
using System.Net.Sockets;

namespace OffloadRpc.Transport;

/// <summary>
/// The server's rendezvous: listens on the endpoint's Unix socket, runs the handshake for each client
/// and keeps its connections. A client that fails, dies or breaks the protocol loses only its own
/// connection; its memory is given back when the connection's threads exit.
/// </summary>
internal sealed class RpcListener : IAsyncDisposable
{
    private readonly TransportOptions _options;
    private readonly Func<RpcConnection, IRequestHandler> _handlerFactory;
    private readonly IReadOnlyList<ContractDescriptor> _served;
    private readonly ConcurrentDictionary<RpcConnection, byte> _connections = new();
    private readonly CancellationTokenSource _stopping = new();
    private Socket? _socket;
    private Task? _acceptLoop;
    private int _disposed;
    private int _handshakes;

    public RpcListener(string endpoint, TransportOptions options, IReadOnlyList<ContractDescriptor> served, Func<RpcConnection, IRequestHandler> handlerFactory)
    {
        SocketPath = EndpointPath.Resolve(endpoint);
        _options = options;
        _served = served;
        _handlerFactory = handlerFactory;
    }

    public string SocketPath { get; }

    /// <summary>Connections that completed the handshake and are open.</summary>
    public ICollection<RpcConnection> Connections => _connections.Keys;

    /// <summary>Raised when a client is refused at the handshake (uid, version, contract, malformed) or an accepted connection ends with an error.</summary>
    public event Action<Exception>? ConnectionFailed;

    public void Start()
    {
        ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);
        if (_socket is not null)
        {
            throw new InvalidOperationException("The listener is already started.");
        }

        RemoveStaleSocket(SocketPath);
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            socket.Bind(new UnixDomainSocketEndPoint(SocketPath));
            socket.Listen(128);
        }
        catch
        {
            socket.Dispose();
            throw;
        }

        _socket = socket;
        _acceptLoop = AcceptLoopAsync(socket, _stopping.Token);
    }

    /// <summary>
    /// Clears the way for the listening socket: deletes only a socket file it can prove stale (nobody
    /// accepts on it: the connection is refused). Anything else at the path is somebody's file and an error.
    /// </summary>
    private static void RemoveStaleSocket(string path)
    {
        string? kind = EndpointPath.KindOf(path);
        if (kind is null)
        {
            return;
        }

        if (kind != "socket")
        {
            throw new IOException($"The endpoint path {path} holds a {kind}, not a socket; refusing to replace it. Remove it or choose another endpoint.");
        }

        using var probe = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            probe.Connect(new UnixDomainSocketEndPoint(path));
        }
        catch (SocketException ex) when (ex.SocketErrorCode == SocketError.ConnectionRefused)
        {
            File.Delete(path); // a socket nobody listens on: left over from a process that died
            return;
        }
        catch (SocketException ex)
        {
            throw new IOException($"The endpoint path {path} holds a socket that could not be probed ({ex.SocketErrorCode}); refusing to replace it.", ex);
        }

        throw new InvalidOperationException($"Another server is already listening at {path}.");
    }

    private async Task AcceptLoopAsync(Socket socket, CancellationToken stopping)
    {
        while (!stopping.IsCancellationRequested)
        {
            Socket client;
            try
            {
                client = await socket.AcceptAsync(stopping).ConfigureAwait(false);
            }
            catch (OperationCanceledException)
            {
                return;
            }
            catch (ObjectDisposedException)
            {
                return;
            }
            catch (SocketException ex)
            {
                if (stopping.IsCancellationRequested)
                {
                    return;
                }

                Report(ex);
                continue;
            }

            // Budgets: handshakes in progress and open connections. A client past either is refused at
            // once (a flood of silent sockets cannot hold the server's memory or descriptors).
            if (Interlocked.Increment(ref _handshakes) > _options.MaxConcurrentHandshakes)
            {
                Interlocked.Decrement(ref _handshakes);
                client.Dispose();
                Report(new ProtocolViolationException($"A client was refused: {_options.MaxConcurrentHandshakes} handshakes are already in progress (MaxConcurrentHandshakes)."));
                continue;
            }

            // The handshake waits in the reactor, not on a thread: a slow or silent client costs none.
            _ = AdmitAsync(client, stopping);
        }
    }

    private async Task AdmitAsync(Socket client, CancellationToken stopping)
    {
        RpcConnection connection;
        try
        {
            if (_connections.Count >= _options.MaxConnections)
            {
                client.Dispose();
                throw new ProtocolViolationException($"A client was refused: {_options.MaxConnections} connections are open (MaxConnections).");
            }

            connection = await Handshake.AcceptAsync(client, _options, _served, new DeferredHandler(this), stopping).ConfigureAwait(false);
        }
        catch (Exception ex)
        {
            Report(ex);
            return;
        }
        finally
        {
            Interlocked.Decrement(ref _handshakes);
        }

        connection.ServedCallsDrained = ServedCallsDrained;
        _connections[connection] = 0;
        Diagnostics.Log.ConnectionAccepted(_options.Logger, connection.Peer.ProcessId, connection.Peer.UserId, SocketPath);
        connection.Closed += OnConnectionClosed;
        if (connection.IsClosed || Volatile.Read(ref _disposed) != 0)
        {
            OnConnectionClosed(connection, connection.TerminalException ?? new ObjectDisposedException(nameof(RpcListener)));
            _ = connection.DisposeAsync().AsTask();
        }
    }

    private void OnConnectionClosed(RpcConnection connection, Exception reason)
    {
        if (_connections.TryRemove(connection, out _))
        {
            ServedCallsDrained?.Invoke(); // its calls count no more
            if (reason is ProtocolViolationException)
            {
                Report(reason, refused: false); // the connection logged it
            }

            // Free the socket once the connection's threads are done (this runs on one of them).
            _ = connection.Completion.ContinueWith(static (_, c) => ((RpcConnection)c!).DisposeAsync(), connection, CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
        }
    }

    private void Report(Exception ex, bool refused = true)
    {
        if (refused)
        {
            Diagnostics.Log.ConnectionRefused(_options.Logger, SocketPath, ex.Message, ex);
        }

        try
        {
            ConnectionFailed?.Invoke(ex);
        }
        catch (Exception handlerError) when (handlerError is not OutOfMemoryException)
        {
            System.Diagnostics.Trace.TraceError($"OffloadRpc: a ConnectionFailed handler threw: {handlerError}");
        }
    }

    /// <summary>Stops accepting clients: the listening socket closes and its file goes; open connections stay.</summary>
    public async Task StopAcceptingAsync()
    {
        if (_stopping.IsCancellationRequested)
        {
            return;
        }

        await _stopping.CancelAsync().ConfigureAwait(false);
        _socket?.Dispose();
        if (_acceptLoop is not null)
        {
            await _acceptLoop.ConfigureAwait(false);
        }

        if (_socket is not null)
        {
            try
            {
                File.Delete(SocketPath);
            }
            catch (IOException)
            {
            }
        }
    }

    /// <summary>Called when a connection's requests being served drop to none, or a connection goes (set before <see cref="Start"/>).</summary>
    public Action? ServedCallsDrained { get; set; }

    /// <summary>Requests being served on every open connection.</summary>
    public int ServedCallsInFlight
    {
        get
        {
            int count = 0;
            foreach (RpcConnection connection in _connections.Keys)
            {
                count += connection.ServedCallsInFlight;
            }

            return count;
        }
    }

    public async ValueTask DisposeAsync()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
        {
            return;
        }

        await StopAcceptingAsync().ConfigureAwait(false);
        foreach (RpcConnection connection in _connections.Keys)
        {
            await connection.DisposeAsync().ConfigureAwait(false);
        }

        _stopping.Dispose();
    }

    /// <summary>Creates the connection's handler on its first request, once the connection object exists.</summary>
    private sealed class DeferredHandler : IRequestHandler
    {
        private readonly RpcListener _listener;
        private IRequestHandler? _inner;

        public DeferredHandler(RpcListener listener) => _listener = listener;

        public ValueTask HandleAsync(IncomingCall call) =>
            (_inner ??= _listener._handlerFactory(call.Connection)).HandleAsync(call);
    }
}
