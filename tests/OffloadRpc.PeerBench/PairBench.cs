using System.Diagnostics;
using OffloadRpc.Cli;

namespace OffloadRpc.PeerBench;

/// <summary>
/// <c>--pairs</c>: grpc-uds against offloadrpc-grpc on small calls, where the two differ by a few percent
/// and a shared two-core machine drifts by more than that within seconds. The two take turns in blocks
/// of <see cref="Block"/> calls (about 30 ms), the order swapped every round, and each block of one is
/// compared with the block of the other next to it in time: the median of those ratios is what drift
/// leaves alone, and its quartiles say how far to trust it. One server process serves both (each client
/// has its own connection), so the two differ in their code only, not also in two server processes'
/// places on the cores and their heaps: measured against a server process each, taking turns, the
/// ratios' quartiles were about a third narrower.
/// </summary>
internal static class PairBench
{
    private const int Block = 400;

    public static async Task<int> RunAsync(TimeSpan perOperation)
    {
        string directory = Path.Combine(Path.GetTempPath(), $"offloadrpc-pairs-{Environment.ProcessId}");
        Directory.CreateDirectory(directory);
        try
        {
            byte[] source = new byte[64];
            new Random(20261125).NextBytes(source);
            string socket = Path.Combine(directory, "grpc.sock");
            await using ServerProcess server = await ServerProcess.StartAsync("grpc-both", socket); // one process serves both: see Servers.ServeGrpcAsync
            await using OffloadRpcConnection connection = await OffloadGrpcPeerClient.ConnectAsync(socket);
            PeerClient[] clients = [new GrpcPeerClient(socket, source), new OffloadGrpcPeerClient(connection, source)]; // a connection each
            try
            {
                await MeasureAsync(clients, server, source, perOperation);
            }
            finally
            {
                foreach (PeerClient client in clients)
                {
                    await client.DisposeAsync();
                }
            }

            return 0;
        }
        finally
        {
            Directory.Delete(directory, recursive: true);
        }
    }

    private static async Task MeasureAsync(PeerClient[] clients, ServerProcess server, byte[] source, TimeSpan perOperation)
    {
        ProcessCpu serving = ProcessCpu.Of(server.ProcessId); // a block's server CPU is the stack's whose block it is: the other is idle
        var expected = new Dictionary<Op, ulong> { [Op.Add] = 65, [Op.Checksum] = PayloadChecksum.Compute(source), [Op.Touch] = 64 };

        foreach (PeerClient client in clients)
        {
            var warm = Stopwatch.StartNew();
            while (warm.Elapsed < TimeSpan.FromSeconds(3)) // past the tier-1 compiles of both processes
            {
                foreach ((Op op, ulong value) in expected)
                {
                    await CheckAsync(client, op, value);
                }
            }
        }

        Console.WriteLine($"grpc-uds vs offloadrpc-grpc served by one process, 64 B, blocks of {Block} calls taking turns, {perOperation.TotalSeconds:0.#} s per operation ({Environment.ProcessorCount} cores)");
        Console.WriteLine($"{"op",-9} {"pairs",5} {"grpc us",8} {"ours us",8} {"ours/grpc (p25 p50 p75)",26} {"p50 95% CI",16} {"client CPU us",16} {"server CPU us",16}");
        foreach ((Op op, ulong value) in expected)
        {
            var wall = new[] { new List<double>(), new List<double>() };
            var clientCpu = new[] { new List<double>(), new List<double>() };
            var serverCpu = new[] { new List<double>(), new List<double>() };
            var clock = Stopwatch.StartNew();
            for (int round = 0; clock.Elapsed < perOperation; round++)
            {
                for (int turn = 0; turn < 2; turn++)
                {
                    int s = round % 2 == 0 ? turn : 1 - turn;
                    long client0 = ProcessCpu.Self.Nanoseconds, server0 = serving.Nanoseconds, start = Stopwatch.GetTimestamp();
                    for (int i = 0; i < Block; i++)
                    {
                        await CheckAsync(clients[s], op, value);
                    }

                    wall[s].Add(Stopwatch.GetElapsedTime(start).TotalMicroseconds / Block);
                    clientCpu[s].Add((ProcessCpu.Self.Nanoseconds - client0) / 1e3 / Block);
                    serverCpu[s].Add((serving.Nanoseconds - server0) / 1e3 / Block);
                }
            }

            double[] ratios = [.. wall[1].Zip(wall[0], (ours, grpc) => ours / grpc).Order()];
            Console.WriteLine(
                $"{op.ToString().ToLowerInvariant(),-9} {ratios.Length,5} {Median(wall[0]),8:F1} {Median(wall[1]),8:F1} {$"{Quantile(ratios, 0.25):F3} {Quantile(ratios, 0.5):F3} {Quantile(ratios, 0.75):F3}",26} {MedianInterval(ratios),16} {$"{Median(clientCpu[0]):F1} {Median(clientCpu[1]):F1}",16} {$"{Median(serverCpu[0]):F1} {Median(serverCpu[1]):F1}",16}");
        }
    }

    /// <summary>One call of 64 bytes, its result checked.</summary>
    internal static async ValueTask CheckAsync(PeerClient client, Op op, ulong expected)
    {
        ulong result = await client.InvokeAsync(op, 64);
        if (result != expected)
        {
            throw new InvalidDataException($"{client.System} {op} of 64 bytes returned {result:x16}, expected {expected:x16}.");
        }
    }

    internal static double Median(List<double> values) => Quantile([.. values.Order()], 0.5);

    /// <summary>
    /// A 95% interval for the median of <paramref name="sorted"/>, from order statistics alone (no
    /// assumption about the ratios' distribution, only that the pairs are independent): the values of
    /// (1-based) ranks floor(n/2 - 0.98 sqrt(n)) and ceil(1 + n/2 + 0.98 sqrt(n)), rounded outwards. Printed as
    /// "[lo hi]"; a median is told from 1 only when 1 is outside it. It is one run's: between runs the
    /// median moves by more.
    /// </summary>
    internal static string MedianInterval(double[] sorted)
    {
        int n = sorted.Length;
        if (n < 6)
        {
            return "[too few]";
        }

        double half = 0.98 * Math.Sqrt(n);
        int lower = Math.Max(1, (int)Math.Floor((n / 2.0) - half));
        int upper = Math.Min(n, (int)Math.Ceiling(1 + (n / 2.0) + half));
        return $"[{sorted[lower - 1]:F3} {sorted[upper - 1]:F3}]";
    }

    internal static double Quantile(double[] sorted, double q) => sorted.Length == 0 ? double.NaN : sorted[(int)Math.Round(q * (sorted.Length - 1))];
}
