using Microsoft.Extensions.DependencyInjection.Extensions;
using Microsoft.Extensions.Hosting;
using OffloadRpc;
using OffloadRpc.Hosting;
using OffloadRpc.Hosting.Internal;

namespace Microsoft.Extensions.DependencyInjection;

/// <summary>Registers OffloadRpc servers and clients with a service collection, as AddGrpc and AddGrpcClient do.</summary>
public static class OffloadRpcServiceCollectionExtensions
{
    /// <summary>
    /// Serves the services added to the returned builder on <paramref name="endpoint"/> (an endpoint name,
    /// or a socket path with a '/'), as a hosted service started and stopped with the host. Called again
    /// with the same endpoint it returns a builder for the same server (and adds <paramref name="configure"/>).
    /// </summary>
    public static OffloadRpcServerBuilder AddOffloadRpcServer(this IServiceCollection services, string endpoint, Action<OffloadRpcOptions>? configure = null)
    {
        ArgumentNullException.ThrowIfNull(services);
        ArgumentException.ThrowIfNullOrWhiteSpace(endpoint);
        services.TryAddSingleton<HostedServers>();
        TransportExtensions.AddTo(services);
        ServerRegistration? registration = Find<ServerRegistration>(services, r => r.Endpoint == endpoint);
        if (registration is null)
        {
            registration = new ServerRegistration(endpoint);
            services.AddSingleton(registration);
            ServerRegistration added = registration;
            services.AddSingleton<IHostedService>(provider => provider.GetRequiredService<HostedServers>().For(added));
        }

        if (configure is not null)
        {
            registration.Configure.Add(configure);
        }

        return new OffloadRpcServerBuilder(services, registration);
    }

    /// <summary>
    /// Registers <typeparamref name="TService"/> (an [OffloadService] interface) for injection: a proxy over
    /// the connection to <paramref name="endpoint"/>, shared by every service registered for that endpoint.
    /// It connects on first use; after the server dies or restarts the calls in flight fail with
    /// <see cref="PeerDisconnectedException"/> and later calls connect again (with backoff between failed attempts).
    /// </summary>
    public static OffloadRpcClientBuilder AddOffloadRpcClient<TService>(this IServiceCollection services, string endpoint, Action<OffloadRpcOptions>? configure = null)
        where TService : class
    {
        ArgumentNullException.ThrowIfNull(services);
        ArgumentException.ThrowIfNullOrWhiteSpace(endpoint);
        services.TryAddSingleton<ManagedConnections>();
        ClientRegistration? registration = Find<ClientRegistration>(services, r => r.Endpoint == endpoint);
        if (registration is null)
        {
            registration = new ClientRegistration(endpoint);
            services.AddSingleton(registration);
        }

        if (configure is not null)
        {
            registration.Configure.Add(configure);
        }

        registration.Contracts.Add(connection => connection.GetService<TService>()); // throws ContractMismatchException when the server differs
        ClientRegistration target = registration;
        services.AddSingleton(provider => provider.GetRequiredService<ManagedConnections>().For(target).GetProxy<TService>());
        return new OffloadRpcClientBuilder(services, registration);
    }

    private static T? Find<T>(IServiceCollection services, Func<T, bool> match)
        where T : class
    {
        foreach (ServiceDescriptor descriptor in services)
        {
            if (descriptor.ServiceType == typeof(T) && !descriptor.IsKeyedService && descriptor.ImplementationInstance is T instance && match(instance))
            {
                return instance;
            }
        }

        return null;
    }
}
