using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Diagnostics.HealthChecks;
using OffloadRpc.Hosting.Internal;

namespace OffloadRpc.Hosting;

/// <summary>Health of the hosted OffloadRpc servers: healthy while every one listens (and serves).</summary>
internal sealed class ServerHealthCheck(HostedServers servers) : IHealthCheck
{
    public Task<HealthCheckResult> CheckHealthAsync(HealthCheckContext context, CancellationToken cancellationToken = default)
    {
        HostedServer[] all = servers.All;
        if (all.Length == 0)
        {
            return Task.FromResult(HealthCheckResult.Unhealthy("No OffloadRpc server is registered (AddOffloadRpcServer)."));
        }

        var data = new Dictionary<string, object>();
        bool healthy = true;
        foreach (HostedServer server in all)
        {
            OffloadRpcServer? running = server.Server;
            bool listening = server.State == "listening" && running is { IsListening: true };
            healthy &= listening;
            data[server.Endpoint] = listening
                ? $"listening; {running!.ConnectionCount} connections, {running.CallsInFlight} calls in flight"
                : server.State;
        }

        return Task.FromResult(healthy
            ? HealthCheckResult.Healthy("Every OffloadRpc server listens.", data)
            : HealthCheckResult.Unhealthy("An OffloadRpc server is not listening.", data: data));
    }
}

/// <summary>Health of the client connection to one endpoint: healthy when it is connected or can connect now.</summary>
internal sealed class ClientHealthCheck(ManagedConnections connections, string endpoint) : IHealthCheck
{
    public async Task<HealthCheckResult> CheckHealthAsync(HealthCheckContext context, CancellationToken cancellationToken = default)
    {
        ManagedConnection connection = connections.Find(endpoint)
            ?? throw new InvalidOperationException($"No OffloadRpc client is registered for {endpoint} (AddOffloadRpcClient).");
        try
        {
            OffloadRpcConnection connected = await connection.ConnectAsync(cancellationToken).ConfigureAwait(false);
            return HealthCheckResult.Healthy(connected.UsesSharedMemory
                ? $"Connected to {endpoint} over shared memory (server process {connected.PeerProcessId})."
                : $"Connected to {endpoint} over gRPC.");
        }
        catch (Exception ex) when (ex is not OperationCanceledException || !cancellationToken.IsCancellationRequested)
        {
            return new HealthCheckResult(context.Registration.FailureStatus, $"Cannot connect to {endpoint}: {ex.Message}", ex);
        }
    }
}
