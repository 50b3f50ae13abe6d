using Grpc.AspNetCore.Server.Model;
using Microsoft.AspNetCore.Routing;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.DependencyInjection.Extensions;
using OffloadRpc.Grpc.Internal;

namespace Microsoft.Extensions.DependencyInjection
{
    /// <summary>Registers the gRPC transport of OffloadRpc with a service collection.</summary>
    public static class OffloadRpcGrpcServiceCollectionExtensions
    {
        /// <summary>
        /// Adds gRPC (AddGrpc) and the binding of every service registered with
        /// AddOffloadRpcServer(...).AddService&lt;TService, TImplementation&gt;() as gRPC methods, which
        /// <c>app.MapOffloadRpcGrpc()</c> then serves. Message limits of these methods fit the transport's
        /// frames (buffers cross in chunks of 1 MiB), whatever the application's own gRPC limits are.
        /// </summary>
        public static IServiceCollection AddOffloadRpcGrpc(this IServiceCollection services)
        {
            ArgumentNullException.ThrowIfNull(services);
            services.AddGrpc().AddServiceOptions<OffloadRpcGrpcService>(o =>
            {
                o.MaxReceiveMessageSize = Frame.MaxFrameBytes;
                o.MaxSendMessageSize = Frame.MaxFrameBytes;
            });
            services.TryAddSingleton<OffloadRpcGrpcService>();
            services.TryAddEnumerable(ServiceDescriptor.Singleton<IServiceMethodProvider<OffloadRpcGrpcService>, GrpcServiceBinder>());
            return services;
        }
    }
}

namespace Microsoft.AspNetCore.Builder
{
    /// <summary>Serves OffloadRpc services over gRPC in an ASP.NET Core application.</summary>
    public static class OffloadRpcGrpcEndpointRouteBuilderExtensions
    {
        /// <summary>
        /// Serves every service registered with AddOffloadRpcServer(...).AddService&lt;...&gt;() over gRPC too,
        /// each method as <c>/{Namespace.Interface}/{Method}</c>. AddOffloadRpcServer registers what this needs
        /// when the application references OffloadRpc.Grpc (<c>services.AddOffloadRpcGrpc()</c> does the same explicitly).
        /// Clients connect with <c>OffloadRpcConnection.ConnectAsync("http://host:port")</c>; those on this
        /// host switch to the server's shared-memory endpoint on their own.
        /// </summary>
        public static GrpcServiceEndpointConventionBuilder MapOffloadRpcGrpc(this IEndpointRouteBuilder endpoints)
        {
            ArgumentNullException.ThrowIfNull(endpoints);
            if (endpoints.ServiceProvider.GetService<OffloadRpcGrpcService>() is null)
            {
                throw new InvalidOperationException("MapOffloadRpcGrpc serves the services of AddOffloadRpcServer(...).AddService<...>(): register them (or call services.AddOffloadRpcGrpc()) before the application is built.");
            }

            // A unary method's request (one frame: MessagePack up to MaxMessageBytes) is read whole before the
            // method runs, under Kestrel's request body limit (30 MB by default); the streaming methods lift
            // that limit themselves, and gRPC's message limit (the transport's frame size) bounds both.
            return endpoints.MapGrpcService<OffloadRpcGrpcService>().WithMetadata(NoRequestBodyLimit.Instance);
        }

        private sealed class NoRequestBodyLimit : Microsoft.AspNetCore.Http.Metadata.IRequestSizeLimitMetadata
        {
            public static readonly NoRequestBodyLimit Instance = new();

            public long? MaxRequestBodySize => null;
        }
    }
}
