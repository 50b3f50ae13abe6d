using Microsoft.Extensions.Diagnostics.HealthChecks;
using OffloadRpc.Hosting;
using OffloadRpc.Hosting.Internal;

namespace Microsoft.Extensions.DependencyInjection;

/// <summary>Registers OffloadRpc health checks (as Grpc.AspNetCore.HealthChecks does for gRPC).</summary>
public static class OffloadRpcHealthChecksBuilderExtensions
{
    /// <summary>A check that every server added with AddOffloadRpcServer is listening.</summary>
    public static IHealthChecksBuilder AddOffloadRpcServer(this IHealthChecksBuilder builder, string name = "offloadrpc-server", HealthStatus? failureStatus = null, IEnumerable<string>? tags = null)
    {
        ArgumentNullException.ThrowIfNull(builder);
        return builder.Add(new HealthCheckRegistration(name, provider => new ServerHealthCheck(provider.GetRequiredService<HostedServers>()), failureStatus, tags));
    }

    /// <summary>A check that the client of <paramref name="endpoint"/> (added with AddOffloadRpcClient) is connected or can connect.</summary>
    public static IHealthChecksBuilder AddOffloadRpcClient(this IHealthChecksBuilder builder, string endpoint, string? name = null, HealthStatus? failureStatus = null, IEnumerable<string>? tags = null)
    {
        ArgumentNullException.ThrowIfNull(builder);
        ArgumentException.ThrowIfNullOrWhiteSpace(endpoint);
        return builder.Add(new HealthCheckRegistration(name ?? "offloadrpc-client-" + endpoint, provider => new ClientHealthCheck(provider.GetRequiredService<ManagedConnections>(), endpoint), failureStatus, tags));
    }
}
