using Microsoft.Extensions.DependencyInjection;

namespace OffloadRpc.Hosting.Internal;

/// <summary>
/// Transports besides shared memory that serve the hosted servers' services (today gRPC, in the
/// OffloadRpc.Grpc assembly, which this one does not reference: a client-only application ships the gRPC
/// client, OffloadRpc.Grpc.Client, without ASP.NET Core). An application that references
/// OffloadRpc.Grpc gets its services registered by AddOffloadRpcServer, so that
/// <c>app.MapOffloadRpcGrpc()</c> is all it writes.
/// </summary>
internal static class TransportExtensions
{
    private static Action<IServiceCollection>? s_grpc;

    /// <summary>Called by the OffloadRpc.Grpc assembly's module initializer.</summary>
    public static void RegisterGrpc(Action<IServiceCollection> addServices) => s_grpc = addServices;

    /// <summary>Adds the services of every transport the application ships (none when it ships only shared memory).</summary>
    [System.Diagnostics.CodeAnalysis.UnconditionalSuppressMessage("Trimming", "IL2026", Justification = "A type named by a constant string (see RemoteTransports.RunModuleInitializerOf): kept when its assembly is part of the application; without it nothing is found and nothing is added.")]
    public static void AddTo(IServiceCollection services)
    {
        if (Volatile.Read(ref s_grpc) is null)
        {
            OffloadRpc.Internal.RemoteTransports.RunModuleInitializerOf(static () => Type.GetType("OffloadRpc.Grpc.Internal.GrpcServerTransport, OffloadRpc.Grpc", throwOnError: false));
        }

        Volatile.Read(ref s_grpc)?.Invoke(services);
    }
}
