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
        ServerRegistration registration = Registration(services, endpoint, configure, static e => new ServerRegistration(e), out bool added);
        if (added)
        {
            services.AddSingleton<IHostedService>(provider => provider.GetRequiredService<HostedServers>().For(registration));
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
        ClientRegistration registration = Registration(services, endpoint, configure, static e => new ClientRegistration(e), out _);
        registration.Contracts.Add(connection => connection.GetService<TService>()); // throws ContractMismatchException when the server differs
        services.AddSingleton(provider => provider.GetRequiredService<ManagedConnections>().For(registration).GetProxy<TService>());
        return new OffloadRpcClientBuilder(services, registration);
    }

    /// <summary>The registration of <paramref name="endpoint"/> (added to <paramref name="services"/> when it is the first), with <paramref name="configure"/> added to it.</summary>
    private static T Registration<T>(IServiceCollection services, string endpoint, Action<OffloadRpcOptions>? configure, Func<string, T> create, out bool added)
        where T : EndpointRegistration
    {
        T? registration = null;
        foreach (ServiceDescriptor descriptor in services)
        {
            if (descriptor.ServiceType == typeof(T) && !descriptor.IsKeyedService && descriptor.ImplementationInstance is T instance && instance.Endpoint == endpoint)
            {
                registration = instance;
                break;
            }
        }

        added = registration is null;
        if (registration is null)
        {
            registration = create(endpoint);
            services.AddSingleton(registration);
        }

        if (configure is not null)
        {
            registration.Configure.Add(configure);
        }

        return registration;
    }
}
