using System.Diagnostics.CodeAnalysis;
using Microsoft.Extensions.DependencyInjection;
using OffloadRpc.Hosting.Internal;

namespace OffloadRpc.Hosting;

/// <summary>Adds services and interceptors to the OffloadRpc server of one endpoint (as gRPC's IGrpcServerBuilder does).</summary>
public sealed class OffloadRpcServerBuilder
{
    internal OffloadRpcServerBuilder(IServiceCollection services, ServerRegistration registration)
    {
        Services = services;
        Registration = registration;
    }

    /// <summary>The application's services.</summary>
    public IServiceCollection Services { get; }

    /// <summary>The endpoint the server listens on (an endpoint name, or a socket path with a '/').</summary>
    public string Endpoint => Registration.Endpoint;

    internal ServerRegistration Registration { get; }

    /// <summary>
    /// Serves <typeparamref name="TService"/> (an [OffloadService] interface) with <typeparamref name="TImplementation"/>
    /// from DI. <see cref="ServiceLifetime.Scoped"/> (the default) and <see cref="ServiceLifetime.Transient"/>: an
    /// instance per call, resolved in a scope made for the call and disposed with it (as gRPC does);
    /// <see cref="ServiceLifetime.Singleton"/>: one instance for every call. An implementation already
    /// registered in the service collection keeps its own registration.
    /// </summary>
    public OffloadRpcServerBuilder AddService<TService, [DynamicallyAccessedMembers(DynamicallyAccessedMemberTypes.PublicConstructors)] TImplementation>(ServiceLifetime lifetime = ServiceLifetime.Scoped)
        where TService : class
        where TImplementation : class, TService
    {
        if (!Services.Any(d => d.ServiceType == typeof(TImplementation)))
        {
            Services.Add(new ServiceDescriptor(typeof(TImplementation), typeof(TImplementation), lifetime));
        }

        if (OffloadRpc.Internal.ServiceRegistry.Find<TService>() is { } descriptor)
        {
            Registration.Descriptors.Add(descriptor);
        }

        Registration.HasScopedServices |= lifetime != ServiceLifetime.Singleton;
        Registration.Services.Add(lifetime == ServiceLifetime.Singleton
            ? (server, provider) => server.Register<TService>(provider.GetRequiredService<TImplementation>())
            : (server, _) => server.Register<TService>(context => CallScope.Services(context).GetRequiredService<TImplementation>()));
        return this;
    }

    /// <summary>
    /// Runs <typeparamref name="TInterceptor"/> around every call of this server, after the interceptors
    /// added before it. It is resolved in the call's scope (registered there, or made with its constructor's
    /// dependencies from DI), so a scoped interceptor is made per call.
    /// </summary>
    public OffloadRpcServerBuilder AddInterceptor<[DynamicallyAccessedMembers(DynamicallyAccessedMemberTypes.PublicConstructors)] TInterceptor>()
        where TInterceptor : ServerInterceptor
    {
        Registration.Interceptors.Add(provider => ActivatorUtilities.GetServiceOrCreateInstance<TInterceptor>(provider));
        return this;
    }
}

/// <summary>Adds interceptors to the OffloadRpc client of one endpoint.</summary>
public sealed class OffloadRpcClientBuilder
{
    internal OffloadRpcClientBuilder(IServiceCollection services, ClientRegistration registration)
    {
        Services = services;
        Registration = registration;
    }

    /// <summary>The application's services.</summary>
    public IServiceCollection Services { get; }

    /// <summary>The endpoint the client connects to.</summary>
    public string Endpoint => Registration.Endpoint;

    internal ClientRegistration Registration { get; }

    /// <summary>
    /// Runs <typeparamref name="TInterceptor"/> around every call made to this endpoint, after the ones
    /// added before it; resolved once from the root provider (registered, or made with its constructor's dependencies).
    /// </summary>
    public OffloadRpcClientBuilder AddInterceptor<[DynamicallyAccessedMembers(DynamicallyAccessedMemberTypes.PublicConstructors)] TInterceptor>()
        where TInterceptor : ClientInterceptor
    {
        Registration.Interceptors.Add(provider => ActivatorUtilities.GetServiceOrCreateInstance<TInterceptor>(provider));
        return this;
    }
}
