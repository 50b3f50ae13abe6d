using System.Diagnostics;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.TestHost;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;
using OffloadRpc.Cli;

namespace OffloadRpc.PeerBench;

/// <summary>
/// <c>--pairs --in-process</c>: plain gRPC and this library's gRPC transport served by one ASP.NET Core app
/// over its in-memory TestServer, called from the same process in alternating blocks. No sockets and no
/// second process: what is left is what each stack does per call (both run the same gRPC client and
/// server underneath), so a difference of a few percent that the two-process <c>--pairs</c> loses in the
/// scheduler's noise shows here, with the CPU, the bytes allocated and the GC pause per call of each.
/// </summary>
internal static class InProcessPairs
{
    private const int Block = 1000;

    public static async Task<int> RunAsync(TimeSpan perOperation)
    {
        string directory = Path.Combine(Path.GetTempPath(), $"offloadrpc-inprocess-{Environment.ProcessId}");
        Directory.CreateDirectory(directory);
        try
        {
            WebApplicationBuilder builder = WebApplication.CreateSlimBuilder();
            builder.Logging.ClearProviders();
            builder.WebHost.UseTestServer();
            builder.Services.AddGrpc(options =>
            {
                options.MaxReceiveMessageSize = null;
                options.MaxSendMessageSize = null;
            });

            // As the offloadrpc-grpc server process: a hosted server (listening on shared memory too, unused here) served over gRPC.
            builder.Services.AddOffloadRpcServer(Path.Combine(directory, "server.shm")).AddService<IPeerBenchService, Servers.OffloadService>(ServiceLifetime.Singleton);
            builder.Services.AddOffloadRpcGrpc();
            await using WebApplication app = builder.Build();
            app.MapGrpcService<Servers.GrpcService>();
            app.MapOffloadRpcGrpc();
            await app.StartAsync();
            TestServer server = app.GetTestServer();

            byte[] source = new byte[64];
            new Random(20261125).NextBytes(source);
            OffloadRpcConnection connection = await OffloadGrpcPeerClient.ConnectAsync(server.CreateHandler());
            PeerClient[] clients = [new GrpcPeerClient("grpc", server.CreateHandler(), source), new OffloadGrpcPeerClient(connection, source)]; // each disposes its channel or connection
            try
            {
                await MeasureAsync(clients, source, perOperation);
            }
            finally
            {
                foreach (PeerClient client in clients)
                {
                    await client.DisposeAsync();
                }

                await app.StopAsync();
            }

            return 0;
        }
        finally
        {
            Directory.Delete(directory, recursive: true);
        }
    }

    private static async Task MeasureAsync(PeerClient[] clients, byte[] source, TimeSpan perOperation)
    {
        var expected = new Dictionary<Op, ulong> { [Op.Add] = 65, [Op.Checksum] = PayloadChecksum.Compute(source), [Op.Touch] = 64 };
        var warm = Stopwatch.StartNew();
        while (warm.Elapsed < TimeSpan.FromSeconds(4)) // both stacks past their tier-1 compiles
        {
            foreach (PeerClient client in clients)
            {
                foreach ((Op op, ulong value) in expected)
                {
                    await PairBench.CheckAsync(client, op, value);
                }
            }
        }

        Console.WriteLine($"grpc vs offloadrpc-grpc in one process over TestServer, 64 B, blocks of {Block} calls taking turns, {perOperation.TotalSeconds:0.#} s per operation ({Environment.ProcessorCount} cores)");
        Console.WriteLine($"{"op",-9} {"pairs",5} {"grpc us",8} {"ours us",8} {"ours/grpc (p25 p50 p75)",26} {"p50 95% CI",16} {"CPU us/call",14} {"alloc B/call",14} {"pool items/call",16} {"GC pause us/call",17}");
        foreach ((Op op, ulong value) in expected)
        {
            var wall = new[] { new List<double>(), new List<double>() };
            var cpu = new[] { new List<double>(), new List<double>() };
            var allocated = new[] { new List<double>(), new List<double>() };
            var items = new[] { new List<double>(), new List<double>() };
            var paused = new[] { new List<double>(), new List<double>() }; // gen0 pauses: both stacks' garbage, collected while either runs
            var clock = Stopwatch.StartNew();
            for (int round = 0; clock.Elapsed < perOperation; round++)
            {
                for (int turn = 0; turn < 2; turn++)
                {
                    int s = round % 2 == 0 ? turn : 1 - turn;
                    long cpu0 = ProcessCpu.Self.Nanoseconds, bytes0 = GC.GetTotalAllocatedBytes(precise: false), items0 = ThreadPool.CompletedWorkItemCount, start = Stopwatch.GetTimestamp();
                    TimeSpan pause0 = GC.GetTotalPauseDuration();
                    for (int i = 0; i < Block; i++)
                    {
                        await PairBench.CheckAsync(clients[s], op, value);
                    }

                    wall[s].Add(Stopwatch.GetElapsedTime(start).TotalMicroseconds / Block);
                    cpu[s].Add((ProcessCpu.Self.Nanoseconds - cpu0) / 1e3 / Block);
                    allocated[s].Add((GC.GetTotalAllocatedBytes(precise: false) - bytes0) / (double)Block);
                    items[s].Add((ThreadPool.CompletedWorkItemCount - items0) / (double)Block);
                    paused[s].Add((GC.GetTotalPauseDuration() - pause0).TotalMicroseconds / Block);
                }
            }

            double[] ratios = [.. wall[1].Zip(wall[0], (ours, grpc) => ours / grpc).Order()];
            Console.WriteLine(
                $"{op.ToString().ToLowerInvariant(),-9} {ratios.Length,5} {PairBench.Median(wall[0]),8:F2} {PairBench.Median(wall[1]),8:F2} {$"{PairBench.Quantile(ratios, 0.25):F3} {PairBench.Quantile(ratios, 0.5):F3} {PairBench.Quantile(ratios, 0.75):F3}",26} {PairBench.MedianInterval(ratios),16} {$"{PairBench.Median(cpu[0]):F1} {PairBench.Median(cpu[1]):F1}",14} {$"{PairBench.Median(allocated[0]):F0} {PairBench.Median(allocated[1]):F0}",14} {$"{PairBench.Median(items[0]):F2} {PairBench.Median(items[1]):F2}",16} {$"{PairBench.Median(paused[0]):F2} {PairBench.Median(paused[1]):F2}",17}");
        }
    }
}
