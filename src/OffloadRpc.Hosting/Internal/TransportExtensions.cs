using System.Diagnostics.CodeAnalysis;
using Microsoft.Extensions.DependencyInjection;

namespace OffloadRpc.Hosting.Internal;

/// <summary>
/// Transports besides shared memory that serve the hosted servers' services (today gRPC, in the
/// OffloadRpc.Grpc assembly, which this one does not reference). An application that references
/// OffloadRpc.Grpc gets its services registered by AddOffloadRpcServer, so that
/// <c>app.MapOffloadRpcGrpc()</c> is all it writes, as the issue of that transport asks.
/// </summary>
internal static class TransportExtensions
{
    private static Action<IServiceCollection>? s_grpc;

    /// <summary>Called by the OffloadRpc.Grpc assembly's module initializer.</summary>
    public static void RegisterGrpc(Action<IServiceCollection> addServices) => s_grpc = addServices;

    /// <summary>Adds the services of every transport the application ships (none when it ships only shared memory).</summary>
    public static void AddTo(IServiceCollection services) => FindGrpc()?.Invoke(services);

    [UnconditionalSuppressMessage("Trimming", "IL2026", Justification = "A type named by a constant string: the trimmer keeps it when its assembly is part of the application; without the assembly the lookup finds nothing.")]
    private static Action<IServiceCollection>? FindGrpc()
    {
        if (Volatile.Read(ref s_grpc) is { } add)
        {
            return add;
        }

        Type? transport;
        try
        {
            transport = Type.GetType("OffloadRpc.Grpc.Internal.GrpcTransport, OffloadRpc.Grpc", throwOnError: false);
        }
        catch (IOException)
        {
            transport = null; // referenced but missing or broken: shared memory only
        }

        if (transport is not null)
        {
            System.Runtime.CompilerServices.RuntimeHelpers.RunModuleConstructor(transport.Module.ModuleHandle);
        }

        return Volatile.Read(ref s_grpc);
    }
}
