using Microsoft.Extensions.DependencyInjection;
using OffloadRpc.Internal;

namespace OffloadRpc.Hosting.Internal;

/// <summary>What servers and clients register alike for one endpoint: its name and the options' configuration.</summary>
internal abstract class EndpointRegistration(string endpoint)
{
    public string Endpoint { get; } = endpoint;

    public List<Action<OffloadRpcOptions>> Configure { get; } = [];

    /// <summary>
    /// The options of this endpoint: each AddOffloadRpc* call's configuration in order, then the host's
    /// <see cref="Microsoft.Extensions.Logging.ILoggerFactory"/> when none was set.
    /// </summary>
    public OffloadRpcOptions BuildOptions(IServiceProvider services)
    {
        var options = new OffloadRpcOptions();
        foreach (Action<OffloadRpcOptions> configure in Configure)
        {
            configure(options);
        }

        options.LoggerFactory ??= services.GetService<Microsoft.Extensions.Logging.ILoggerFactory>();
        return options;
    }
}

/// <summary>Everything registered for the server of one endpoint (one per endpoint, kept in the service collection).</summary>
internal sealed class ServerRegistration(string endpoint) : EndpointRegistration(endpoint)
{
    /// <summary>Registers one service on the server, given the root provider.</summary>
    public List<Action<OffloadRpcServer, IServiceProvider>> Services { get; } = [];

    /// <summary>Makes one interceptor from the call's scope.</summary>
    public List<Func<IServiceProvider, ServerInterceptor>> Interceptors { get; } = [];

    /// <summary>The generated descriptors of the services added (what other transports, such as gRPC, bind).</summary>
    public List<OffloadRpc.Internal.ServiceDescriptor> Descriptors { get; } = [];

    /// <summary>
    /// Whether a call needs a DI scope: some service is scoped or transient, or an interceptor is registered.
    /// A server of singletons alone makes no scope per call (it would be created and disposed for nothing).
    /// </summary>
    public bool NeedsCallScope => HasScopedServices || Interceptors.Count > 0;

    /// <summary>Whether some service was added as scoped or transient (an instance resolved in each call's scope).</summary>
    public bool HasScopedServices { get; set; }
}

/// <summary>Everything registered for the client of one endpoint.</summary>
internal sealed class ClientRegistration(string endpoint) : EndpointRegistration(endpoint)
{
    public List<Func<IServiceProvider, ClientInterceptor>> Interceptors { get; } = [];

    /// <summary>Checks, on each new connection, that the server serves one of the registered services as compiled here.</summary>
    public List<Action<OffloadRpcConnection>> Contracts { get; } = [];
}

/// <summary>The per-call DI scope of a hosted server, kept in the call's <see cref="ServerInterceptorContext.Items"/>.</summary>
internal static class CallScope
{
    public static readonly object Key = new();

    public static IServiceProvider Services(ServerInterceptorContext context) =>
        context.Items.TryGetValue(Key, out object? services) && services is IServiceProvider provider
            ? provider
            : throw new InvalidOperationException("No DI scope for this call: the hosted server's scope interceptor did not run.");
}

/// <summary>
/// The outermost interceptor of a hosted server: makes the call's DI scope (disposed when the call
/// completes, a streamed result's when its last item is out), then runs the interceptors registered with
/// AddInterceptor, resolved in that scope.
/// </summary>
internal sealed class CallScopeInterceptor(IServiceScopeFactory scopes, Func<IServiceProvider, ServerInterceptor>[] interceptors) : ServerInterceptor
{
    public override async ValueTask<TResult> InterceptAsync<TResult>(ServerInterceptorContext context, ServerCallContinuation<TResult> continuation)
    {
        AsyncServiceScope scope = scopes.CreateAsyncScope();
        await using (scope.ConfigureAwait(false))
        {
            context.Items[CallScope.Key] = scope.ServiceProvider;
            ServerCallContinuation<TResult> chain = interceptors.Length == 0
                ? continuation
                : InterceptorChain.Build<ServerInterceptor, ServerCallContinuation<TResult>>(Resolve(scope.ServiceProvider), continuation, static (interceptor, next) => c => interceptor.InterceptAsync(c, next));
            return await chain(context).ConfigureAwait(false);
        }
    }

    public override async IAsyncEnumerable<TItem> InterceptStream<TItem>(ServerInterceptorContext context, ServerStreamContinuation<TItem> continuation)
    {
        AsyncServiceScope scope = scopes.CreateAsyncScope();
        await using (scope.ConfigureAwait(false))
        {
            context.Items[CallScope.Key] = scope.ServiceProvider;
            ServerStreamContinuation<TItem> chain = interceptors.Length == 0
                ? continuation
                : InterceptorChain.Build<ServerInterceptor, ServerStreamContinuation<TItem>>(Resolve(scope.ServiceProvider), continuation, static (interceptor, next) => c => interceptor.InterceptStream(c, next));
            await foreach (TItem item in chain(context).WithCancellation(context.CancellationToken).ConfigureAwait(false))
            {
                yield return item;
            }
        }
    }

    private ServerInterceptor[] Resolve(IServiceProvider services)
    {
        var resolved = new ServerInterceptor[interceptors.Length];
        for (int i = 0; i < resolved.Length; i++)
        {
            resolved[i] = interceptors[i](services);
        }

        return resolved;
    }
}
