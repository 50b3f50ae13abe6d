using System.Diagnostics.CodeAnalysis;

namespace OffloadRpc.Internal;

/// <summary>
/// A connection over a transport to another host (gRPC, in the OffloadRpc.Grpc assembly): what an
/// <see cref="OffloadRpcConnection"/> needs from it besides the invoker its proxies call.
/// </summary>
internal abstract class RemoteConnection : IAsyncDisposable
{
    public abstract CallInvoker Invoker { get; }

    /// <summary>The services the server serves, by name, with their contract hashes.</summary>
    public abstract IReadOnlyDictionary<string, ulong> PeerContracts { get; }

    public abstract int PeerProcessId { get; }

    public abstract uint PeerUserId { get; }

    public abstract bool IsClosed { get; }

    /// <summary>For the connection's description ("grpc http://host:port").</summary>
    public abstract string Description { get; }

    public abstract ValueTask DisposeAsync();
}

/// <summary>
/// Transports to other hosts, found by the address's scheme. The core assembly references none: the
/// OffloadRpc.Grpc assembly registers itself from its module initializer, which runs when any of its code
/// runs, or when <see cref="Find"/> loads it by name (an application that connects to http:// or https://
/// addresses references the OffloadRpc.Grpc package, and so ships the assembly).
/// </summary>
internal static class RemoteTransports
{
    private static Func<string, OffloadRpcOptions, CancellationToken, Task<OffloadRpcConnection>>? s_grpc;

    /// <summary>True for an address another transport serves (http://, https://).</summary>
    public static bool IsNetworkAddress(string endpoint) =>
        endpoint.StartsWith("http://", StringComparison.OrdinalIgnoreCase) || endpoint.StartsWith("https://", StringComparison.OrdinalIgnoreCase);

    /// <summary>Called by the OffloadRpc.Grpc assembly's module initializer.</summary>
    public static void RegisterGrpc(Func<string, OffloadRpcOptions, CancellationToken, Task<OffloadRpcConnection>> connect) => s_grpc = connect;

    public static Task<OffloadRpcConnection> ConnectAsync(string endpoint, OffloadRpcOptions options, CancellationToken cancellationToken)
    {
        Func<string, OffloadRpcOptions, CancellationToken, Task<OffloadRpcConnection>> connect = Find()
            ?? throw new NotSupportedException($"'{endpoint}' is a gRPC address: reference the OffloadRpc.Grpc package (and its assembly must be deployed with the application) to connect over gRPC.");
        return connect(endpoint, options, cancellationToken);
    }

    private static Func<string, OffloadRpcOptions, CancellationToken, Task<OffloadRpcConnection>>? Find()
    {
        if (Volatile.Read(ref s_grpc) is null)
        {
            LoadGrpcAssembly();
        }

        return Volatile.Read(ref s_grpc);
    }

    /// <summary>
    /// Runs the OffloadRpc.Grpc assembly's module initializer when the application ships that assembly (it
    /// registers itself here and with the hosting package); does nothing when it does not.
    /// </summary>
    [UnconditionalSuppressMessage("Trimming", "IL2026", Justification = "A type named by a constant string: the trimmer keeps it when its assembly is part of the application, and without the assembly the lookup finds nothing and the caller is told which package is missing.")]
    internal static void LoadGrpcAssembly()
    {
        Type? transport;
        try
        {
            transport = Type.GetType("OffloadRpc.Grpc.Internal.GrpcTransport, OffloadRpc.Grpc", throwOnError: false);
        }
        catch (IOException)
        {
            transport = null; // the assembly is referenced but missing or broken
        }

        if (transport is not null)
        {
            System.Runtime.CompilerServices.RuntimeHelpers.RunModuleConstructor(transport.Module.ModuleHandle);
        }
    }
}
