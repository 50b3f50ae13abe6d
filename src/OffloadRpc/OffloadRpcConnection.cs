using System.Collections.Concurrent;
using OffloadRpc.Internal;
using OffloadRpc.Transport;

namespace OffloadRpc;

/// <summary>
/// A client's connection to an <see cref="OffloadRpcServer"/> in another process. Thread-safe: any
/// number of threads may call services on one connection at once.
/// </summary>
public sealed class OffloadRpcConnection : IAsyncDisposable
{
    private readonly ConcurrentDictionary<Type, object> _proxies = new();

    private readonly RemoteConnection? _remote;

    private OffloadRpcConnection(RpcConnection transport, OffloadRpcOptions options)
    {
        Transport = transport;
        Invoker = new SharedMemoryInvoker(transport, options.CreateSerializerOptions()) { Pipeline = ClientPipeline.From(options) };
    }

    /// <summary>A connection over another transport (gRPC): its invoker carries the options' interceptors too.</summary>
    internal OffloadRpcConnection(RemoteConnection remote, OffloadRpcOptions options)
    {
        _remote = remote;
        Transport = null!;
        Invoker = remote.Invoker;
        Invoker.Pipeline = ClientPipeline.From(options);
    }

    /// <summary>The shared-memory connection (null on another transport: see <see cref="UsesSharedMemory"/>).</summary>
    internal RpcConnection Transport { get; }

    /// <summary>True when calls go through shared memory; false over gRPC (a server on another host, or the switch to shared memory was off or not possible).</summary>
    public bool UsesSharedMemory => _remote is null;

    /// <summary>What the generated proxies of this connection call.</summary>
    internal CallInvoker Invoker { get; }

    /// <summary>The server process's id, from the kernel (SO_PEERCRED); -1 over gRPC, where nothing vouches for the server's claims.</summary>
    public int PeerProcessId => _remote?.PeerProcessId ?? Transport.Peer.ProcessId;

    /// <summary>The server process's user id, from the kernel; <see cref="uint.MaxValue"/> over gRPC.</summary>
    public uint PeerUserId => _remote?.PeerUserId ?? Transport.Peer.UserId;

    /// <summary>False once the server died, broke the protocol, or the connection was disposed.</summary>
    public bool IsConnected => _remote is null ? !Transport.IsClosed : !_remote.IsClosed;

    /// <summary>
    /// Connects to the server at <paramref name="endpoint"/>: an endpoint name, or a socket path with a '/'
    /// (shared memory); or an <c>http://host:port</c> or <c>https://</c> address, or another <c>scheme://</c>
    /// address that gRPC resolves and balances calls over, such as <c>dns:///host:port</c> (gRPC, which needs the
    /// OffloadRpc.Grpc.Client package, or OffloadRpc.Grpc which includes it; a server on this host that also listens on shared memory is reached
    /// through shared memory instead, unless <see cref="OffloadRpcOptions.PreferSharedMemory"/> is false).
    /// Every service contract compiled into this process is compared with the server's: a service the
    /// two sides define differently fails here with <see cref="ContractMismatchException"/>.
    /// </summary>
    /// <exception cref="UnauthorizedAccessException">The server refused this caller: over shared memory it runs as a user the server does not allow (or the other way round), over gRPC its authentication or authorization refused the channel's credentials.</exception>
    /// <exception cref="PeerDisconnectedException">The server cannot be reached, or the connection could not start.</exception>
    /// <exception cref="ArgumentException">A gRPC address the channel options cannot make a channel of (a scheme no resolver serves, a resolved address without credentials).</exception>
    public static async Task<OffloadRpcConnection> ConnectAsync(string endpoint, OffloadRpcOptions? options = null, CancellationToken cancellationToken = default)
    {
        options ??= new OffloadRpcOptions();
        ArgumentException.ThrowIfNullOrWhiteSpace(endpoint);
        if (RemoteTransports.IsNetworkAddress(endpoint))
        {
            return await RemoteTransports.ConnectAsync(endpoint, options, cancellationToken).ConfigureAwait(false);
        }

        TransportOptions transportOptions = options.ToTransportOptions();
        RpcConnection transport = await Handshake.ConnectAsync(endpoint, transportOptions, ServiceRegistry.Contracts(), null, cancellationToken).ConfigureAwait(false);
        Diagnostics.Log.Connected(transportOptions.Logger, endpoint, transport.Peer.ProcessId);
        return new OffloadRpcConnection(transport, options);
    }

    /// <summary>The generated proxy of service <typeparamref name="T"/> on this connection.</summary>
    /// <exception cref="InvalidOperationException"><typeparamref name="T"/> has no generated proxy.</exception>
    /// <exception cref="ContractMismatchException">The server does not serve <typeparamref name="T"/>.</exception>
    public T GetService<T>()
        where T : class
    {
        if (_proxies.TryGetValue(typeof(T), out object? existing))
        {
            return (T)existing;
        }

        ServiceDescriptor<T> descriptor = ServiceRegistry.Find<T>()
            ?? throw new InvalidOperationException($"{typeof(T).FullName} has no generated proxy: mark it [OffloadService] and reference the OffloadRpc generator.");
        IReadOnlyDictionary<string, ulong> peerContracts = _remote?.PeerContracts ?? Transport.PeerContracts;
        if (!peerContracts.TryGetValue(descriptor.Name, out ulong served))
        {
            throw new ContractMismatchException($"The server (process {PeerProcessId}) does not serve {descriptor.Name}.") { ServiceName = descriptor.Name };
        }

        if (served != descriptor.ContractHash)
        {
            throw new ContractMismatchException($"Contract mismatch for {descriptor.Name}: this client was built against {descriptor.ContractHash:x16}, the server implements {served:x16}.") { ServiceName = descriptor.Name };
        }

        return (T)_proxies.GetOrAdd(typeof(T), _ => descriptor.CreateProxy(Invoker));
    }

    /// <summary>
    /// Rents exactly <paramref name="bytes"/> of this connection's shared memory. Write into it in place
    /// and pass it to a call: ownership moves to the server without a copy.
    /// </summary>
    /// <remarks>When the arena is full this waits for the server to give memory back, up to <see cref="OffloadRpcOptions.ArenaWaitTimeout"/>.</remarks>
    /// <exception cref="ArenaExhaustedException">The arena stayed full past its timeout, or <paramref name="bytes"/> can never fit.</exception>
    /// <remarks>Over gRPC the lease is ordinary memory of this process: its bytes are copied into the request.</remarks>
    public SharedBuffer Rent(int bytes) => Rent(bytes, CancellationToken.None);

    /// <summary>
    /// Rents exactly <paramref name="bytes"/> of this connection's shared memory, as <see cref="Rent(int)"/>,
    /// giving up with <see cref="OperationCanceledException"/> when <paramref name="cancellationToken"/>
    /// fires while the arena is full.
    /// </summary>
    public SharedBuffer Rent(int bytes, CancellationToken cancellationToken) =>
        _remote is null ? Transport.Rent(bytes, cancellationToken) : LocalLeases.Instance.Rent(bytes);

    public ValueTask DisposeAsync() => _remote?.DisposeAsync() ?? Transport.DisposeAsync();

    public override string ToString() => _remote is null
        ? $"OffloadRpcConnection(server pid {PeerProcessId}, {(IsConnected ? "connected" : "closed")})"
        : $"OffloadRpcConnection({_remote.Description}, {(IsConnected ? "connected" : "closed")})";
}
