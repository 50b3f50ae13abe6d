using System.Runtime.CompilerServices;

namespace OffloadRpc.Grpc.Internal;

/// <summary>
/// The server side of the gRPC transport: registered with the hosting package when this assembly loads,
/// so that AddOffloadRpcServer adds what <c>app.MapOffloadRpcGrpc()</c> needs (the client side registers
/// itself from OffloadRpc.Grpc.Client).
/// </summary>
internal static class GrpcServerTransport
{
#pragma warning disable CA2255 // a library's module initializer: it only registers the transport with the hosting assembly
    [ModuleInitializer]
    internal static void Register() =>
        OffloadRpc.Hosting.Internal.TransportExtensions.RegisterGrpc(static services => Microsoft.Extensions.DependencyInjection.OffloadRpcGrpcServiceCollectionExtensions.AddOffloadRpcGrpc(services));
#pragma warning restore CA2255
}
