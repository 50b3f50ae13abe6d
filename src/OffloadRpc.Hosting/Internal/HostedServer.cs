using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;

namespace OffloadRpc.Hosting.Internal;

/// <summary>
/// The server of one endpoint as a hosted service: started with the host; on stop it stops accepting,
/// lets calls in flight finish until the host's shutdown timeout (the token StopAsync gets), then
/// closes the connections, which cancels what is still running.
/// </summary>
internal sealed class HostedServer : IHostedService, IAsyncDisposable
{
    private readonly IServiceProvider _services;
    private readonly ServerRegistration _registration;
    private OffloadRpcServer? _server;
    private volatile string _state = "not started";

    public HostedServer(IServiceProvider services, ServerRegistration registration)
    {
        _services = services;
        _registration = registration;
    }

    public string Endpoint => _registration.Endpoint;

    /// <summary>"not started", "listening", "stopping", "stopped" or "failed: ...".</summary>
    public string State => _state;

    public OffloadRpcServer? Server => _server;

    public async Task StartAsync(CancellationToken cancellationToken)
    {
        OffloadRpcOptions options = _registration.BuildOptions(_services);
        if (_registration.NeedsCallScope)
        {
            options.ServerInterceptors.Insert(0, new CallScopeInterceptor(_services.GetRequiredService<IServiceScopeFactory>(), [.. _registration.Interceptors]));
        }

        var server = new OffloadRpcServer(_registration.Endpoint, options);
        try
        {
            foreach (Action<OffloadRpcServer, IServiceProvider> register in _registration.Services)
            {
                register(server, _services);
            }

            await server.StartAsync(cancellationToken).ConfigureAwait(false);
        }
        catch (Exception ex)
        {
            _state = "failed: " + ex.Message;
            await server.DisposeAsync().ConfigureAwait(false);
            throw;
        }

        _server = server;
        _state = "listening";
    }

    public async Task StopAsync(CancellationToken cancellationToken)
    {
        OffloadRpcServer? server = _server;
        if (server is null)
        {
            return;
        }

        _state = "stopping";
        await server.StopAsync(cancellationToken).ConfigureAwait(false);
        _state = "stopped";
    }

    public async ValueTask DisposeAsync()
    {
        if (_server is { } server)
        {
            _state = "stopped";
            await server.DisposeAsync().ConfigureAwait(false);
        }
    }
}

/// <summary>The hosted servers of this application, one per endpoint (what the server health check looks at).</summary>
internal sealed class HostedServers(IServiceProvider services)
{
    private readonly Dictionary<ServerRegistration, HostedServer> _servers = [];

    public HostedServer For(ServerRegistration registration)
    {
        lock (_servers)
        {
            if (!_servers.TryGetValue(registration, out HostedServer? server))
            {
                server = new HostedServer(services, registration);
                _servers.Add(registration, server);
            }

            return server;
        }
    }

    public HostedServer[] All
    {
        get
        {
            lock (_servers)
            {
                return [.. _servers.Values];
            }
        }
    }
}
