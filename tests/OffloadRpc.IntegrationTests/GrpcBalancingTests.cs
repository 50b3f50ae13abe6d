using Grpc.Core;
using Grpc.Net.Client.Balancer;
using Grpc.Net.Client.Configuration;
using Microsoft.Extensions.DependencyInjection;
using OffloadRpc.Grpc;
using OffloadRpc.Testing;
using OffloadRpc.TestContracts;
using OffloadRpc.Tests.Infrastructure;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// gRPC's client-side load balancing under the same proxies: an address that gRPC resolves
/// (<c>dns:///host:port</c>, or a resolver of the channel's service provider) rather than one server's
/// http:// address, and the balancing policy of the channel's service config. Two server processes
/// (TestPeer grpc-server) on 127.0.0.1; each counts the calls its interceptor saw.
/// </summary>
public sealed class GrpcBalancingTests
{
    [Fact]
    public async Task Calls_to_a_resolved_address_are_balanced_round_robin_over_the_servers_it_resolves_to()
    {
        string first = Endpoints.Unique("balanced-a"), second = Endpoints.Unique("balanced-b");
        try
        {
            await using PeerProcess a = PeerProcess.Start(["grpc-server", first]);
            await using PeerProcess b = PeerProcess.Start(["grpc-server", second]);
            Uri[] servers = [new(a.WaitForLine("READY", TimeSpan.FromSeconds(60)).Split(' ')[2]), new(b.WaitForLine("READY", TimeSpan.FromSeconds(60)).Split(' ')[2])];

            var resolved = new ServiceCollection();
            resolved.AddSingleton<ResolverFactory>(new StaticResolverFactory(_ => servers.Select(s => new BalancerAddress(s.Host, s.Port))));
            var options = new OffloadRpcOptions { PreferSharedMemory = false }.ConfigureGrpcChannel(channel =>
            {
                channel.Credentials = ChannelCredentials.Insecure; // a resolved address does not say whether it is TLS
                channel.ServiceProvider = resolved.BuildServiceProvider();
                channel.ServiceConfig = new ServiceConfig { LoadBalancingConfigs = { new RoundRobinConfig() } };
            });
            int calls = 0;
            await using (OffloadRpcConnection balanced = await OffloadRpcConnection.ConnectAsync("static:///images", options))
            {
                Assert.False(balanced.UsesSharedMemory);
                ICallProbe probe = balanced.GetService<ICallProbe>();
                byte[] data = new byte[100_000];
                await Eventually.TrueAsync(
                    async () =>
                    {
                        for (int i = 0; i < 10; i++, calls++)
                        {
                            Checksum64.Fill(data, (ulong)calls);
                            Assert.Equal(Checksum64.Compute(data), await probe.ChecksumAsync(data)); // every call's bytes, whichever server took it
                        }

                        int[] seen = await Task.WhenAll(servers.Select(CountChecksumCallsAsync));
                        return seen.All(n => n > 0);
                    },
                    "both servers take calls");
            }

            int[] counted = await Task.WhenAll(servers.Select(CountChecksumCallsAsync));
            Assert.Equal(calls, counted.Sum()); // each call served once, by one of them
            Assert.All(counted, n => Assert.True(n > 0));
        }
        finally
        {
            Endpoints.RemoveStale(first);
            Endpoints.RemoveStale(second);
        }
    }

    [Fact]
    public async Task A_dns_address_of_a_server_on_this_host_switches_to_shared_memory_unless_told_not_to()
    {
        string endpoint = Endpoints.Unique("dns");
        try
        {
            await using PeerProcess process = PeerProcess.Start(["grpc-server", endpoint]);
            var server = new Uri(process.WaitForLine("READY", TimeSpan.FromSeconds(60)).Split(' ')[2]);
            string address = $"dns:///127.0.0.1:{server.Port}";
            byte[] data = new byte[(2 << 20) + 9];
            Checksum64.Fill(data, 77);
            foreach (bool prefer in new[] { false, true })
            {
                var options = new OffloadRpcOptions { PreferSharedMemory = prefer }.ConfigureGrpcChannel(channel => channel.Credentials = ChannelCredentials.Insecure);
                await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(address, options);
                Assert.Equal(prefer, connection.UsesSharedMemory);
                Assert.Equal(Checksum64.Compute(data), await connection.GetService<IImageService>().ChecksumAsync(data));
            }
        }
        finally
        {
            Endpoints.RemoveStale(endpoint);
        }
    }

    /// <summary>How many ChecksumAsync calls the server at <paramref name="server"/> served, as its interceptor logged them (asked over a connection of its own).</summary>
    private static async Task<int> CountChecksumCallsAsync(Uri server)
    {
        await using OffloadRpcConnection direct = await OffloadRpcConnection.ConnectAsync(server.ToString().TrimEnd('/'), new OffloadRpcOptions { PreferSharedMemory = false });
        string[] log = await direct.GetService<ICallProbe>().ServerLogAsync();
        return log.Count(line => line.StartsWith("intercepted ChecksumAsync ", StringComparison.Ordinal));
    }
}
