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

    private OffloadRpcConnection(RpcConnection transport, OffloadRpcOptions options)
    {
        Transport = transport;
        Invoker = new SharedMemoryInvoker(transport, options.CreateSerializerOptions()) { Pipeline = ClientPipeline.From(options) };
    }

    internal RpcConnection Transport { get; }

    /// <summary>What the generated proxies of this connection call.</summary>
    internal CallInvoker Invoker { get; }

    /// <summary>The server process's id.</summary>
    public int PeerProcessId => Transport.Peer.ProcessId;

    /// <summary>The server process's user id.</summary>
    public uint PeerUserId => Transport.Peer.UserId;

    /// <summary>False once the server died, broke the protocol, or the connection was disposed.</summary>
    public bool IsConnected => !Transport.IsClosed;

    /// <summary>
    /// Connects to the server at <paramref name="endpoint"/> (an endpoint name, or a socket path with a '/').
    /// Every service contract compiled into this process is compared with the server's: a service the
    /// two sides define differently fails here with <see cref="ContractMismatchException"/>.
    /// </summary>
    public static async Task<OffloadRpcConnection> ConnectAsync(string endpoint, OffloadRpcOptions? options = null, CancellationToken cancellationToken = default)
    {
        options ??= new OffloadRpcOptions();
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
        if (!Transport.PeerContracts.TryGetValue(descriptor.Name, out ulong served))
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
    public SharedBuffer Rent(int bytes) => Transport.Rent(bytes, CancellationToken.None);

    /// <summary>
    /// Rents exactly <paramref name="bytes"/> of this connection's shared memory, as <see cref="Rent(int)"/>,
    /// giving up with <see cref="OperationCanceledException"/> when <paramref name="cancellationToken"/>
    /// fires while the arena is full.
    /// </summary>
    public SharedBuffer Rent(int bytes, CancellationToken cancellationToken) => Transport.Rent(bytes, cancellationToken);

    public ValueTask DisposeAsync() => Transport.DisposeAsync();

    public override string ToString() => $"OffloadRpcConnection(server pid {PeerProcessId}, {(IsConnected ? "connected" : "closed")})";
}
