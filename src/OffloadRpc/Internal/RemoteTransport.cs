using System.Diagnostics.CodeAnalysis;

namespace OffloadRpc.Internal;

/// <summary>
/// A connection over a transport to another host (gRPC, in the OffloadRpc.Grpc.Client assembly): what an
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
/// OffloadRpc.Grpc.Client assembly registers itself from its module initializer, which runs when any of its
/// code runs, or when <see cref="Find"/> loads it by name (an application that connects to http://,
/// https:// or other scheme:// addresses references the OffloadRpc.Grpc.Client package, or OffloadRpc.Grpc
/// which includes it, and so ships the assembly).
/// </summary>
internal static class RemoteTransports
{
    private static Func<string, OffloadRpcOptions, CancellationToken, Task<OffloadRpcConnection>>? s_grpc;

    /// <summary>
    /// True for an address the gRPC transport serves: <c>http://</c> and <c>https://</c>, and any other
    /// <c>scheme://</c> address, which gRPC resolves to the servers it balances calls over (<c>dns:///host:port</c>,
    /// or a resolver the channel's service provider registers). A shared-memory endpoint is a name
    /// (letters, digits, '.', '-', '_', never ':') or a socket path; a relative path that starts like a
    /// scheme ("run://x") is taken for an address, and is written "./run://x".
    /// </summary>
    public static bool IsNetworkAddress(string endpoint)
    {
        int colon = endpoint.IndexOf("://", StringComparison.Ordinal);
        if (colon <= 0 || !char.IsAsciiLetter(endpoint[0]))
        {
            return false;
        }

        foreach (char c in endpoint.AsSpan(0, colon))
        {
            if (!char.IsAsciiLetterOrDigit(c) && c is not ('+' or '-' or '.'))
            {
                return false; // a path such as "./a://b" or "/run/x://y": not a scheme
            }
        }

        return true;
    }

    /// <summary>Called by the OffloadRpc.Grpc.Client assembly's module initializer.</summary>
    public static void RegisterGrpc(Func<string, OffloadRpcOptions, CancellationToken, Task<OffloadRpcConnection>> connect) => s_grpc = connect;

    public static Task<OffloadRpcConnection> ConnectAsync(string endpoint, OffloadRpcOptions options, CancellationToken cancellationToken)
    {
        Func<string, OffloadRpcOptions, CancellationToken, Task<OffloadRpcConnection>> connect = Find()
            ?? throw new NotSupportedException($"'{endpoint}' is a gRPC address: reference the OffloadRpc.Grpc.Client package (a client) or OffloadRpc.Grpc (a server, which includes it), and deploy its assembly with the application, to connect over gRPC.");
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
    /// Runs the OffloadRpc.Grpc.Client assembly's module initializer when the application ships that
    /// assembly (it registers itself here); does nothing when it does not.
    /// </summary>
    [UnconditionalSuppressMessage("Trimming", "IL2026", Justification = "A type named by a constant string: the trimmer keeps it when its assembly is part of the application, and without the assembly the lookup finds nothing and the caller is told which package is missing.")]
    internal static void LoadGrpcAssembly() =>
        RunModuleInitializerOf(static () => Type.GetType("OffloadRpc.Grpc.Internal.GrpcTransport, OffloadRpc.Grpc.Client", throwOnError: false));

    /// <summary>
    /// Runs the module initializer of the assembly of the type <paramref name="find"/> looks up when the
    /// application ships it; does nothing when it does not (the gRPC client here, the gRPC server for the
    /// hosting package). Each caller names its type with a constant string in its own call to
    /// <see cref="Type.GetType(string, bool)"/>, where the trimmer sees it and keeps that type and its
    /// module initializer (a name passed through a parameter would not be seen: the assembly would be trimmed away).
    /// </summary>
    internal static void RunModuleInitializerOf(Func<Type?> find)
    {
        Type? transport;
        try
        {
            transport = find();
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
