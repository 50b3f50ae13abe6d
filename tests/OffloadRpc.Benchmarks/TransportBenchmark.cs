using System.Buffers.Binary;
using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json;
using OffloadRpc.Interop;
using OffloadRpc.Testing;
using OffloadRpc.Transport;

namespace OffloadRpc.Benchmarks;

/// <summary>
/// Measures the transport between this process and a server process, and in the same run the floors
/// it is held to: a raw two-process spin ping-pong (latency) and Span.CopyTo into shared memory
/// (bandwidth). Every payload size is first verified end to end by checksum.
/// </summary>
internal static class TransportBenchmark
{
    private static readonly int[] ThroughputSizes = [1 << 20, 16 << 20, 64 << 20, 256 << 20];

    public static async Task<int> RunAsync(bool quick, string? jsonPath)
    {
        var rows = new List<Row>();
        Console.WriteLine($"OffloadRpc transport benchmark{(quick ? " (quick)" : string.Empty)}: {Environment.ProcessorCount} cores, {CpuModel()}, .NET {Environment.Version}");
        Console.WriteLine();

        Console.Write("floor: raw spin ping-pong between two processes ... ");
        double[] pingPong = OffloadRpc.Cli.PingPong.Measure(quick ? 200 : 1000, 1000, (pid, fd) => BenchmarkProcess.StartSelf(["--pingpong", pid.ToString(CultureInfo.InvariantCulture), fd.ToString(CultureInfo.InvariantCulture)]));
        double pingPongP50 = Percentile(pingPong, 0.50);
        Console.WriteLine($"{pingPongP50:0} ns per round trip");

        string endpoint = $"bench-{Environment.ProcessId}";
        using Process server = BenchmarkProcess.StartSelf(["--serve", endpoint]);
        try
        {
            if (server.StandardOutput.ReadLine() != "READY")
            {
                throw new InvalidOperationException("the benchmark server did not start");
            }

            await using RpcConnection connection = await Handshake.ConnectAsync(endpoint, new TransportOptions(), [], null, CancellationToken.None);
            await VerifyAsync(connection);

            // Round trip, 64-byte body, one call at a time.
            int calls = quick ? 100_000 : 400_000;
            Console.Write($"OffloadRpc: {calls:N0} round trips with a 64-byte body ... ");
            long[] latencies = await RoundTripsAsync(connection, 64, calls);
            double p50 = Percentile(latencies, 0.50) * 1e9 / Stopwatch.Frequency;
            double p99 = Percentile(latencies, 0.99) * 1e9 / Stopwatch.Frequency;
            Console.WriteLine($"p50 {p50:0} ns, p99 {p99:0} ns");
            rows.Add(new Row("round trip p50", 64, p50, "ns", pingPongP50, "ping-pong", p50 / pingPongP50, "<= 5x floor", p50 <= 5 * pingPongP50));
            rows.Add(new Row("round trip p99", 64, p99, "ns", Percentile(pingPong, 0.99), "ping-pong", p99 / Percentile(pingPong, 0.99), string.Empty, null));

            foreach (int size in ThroughputSizes)
            {
                int iterations = size switch
                {
                    <= 1 << 20 => quick ? 500 : 2000,
                    <= 64 << 20 => quick ? 12 : 40,
                    _ => quick ? 4 : 12,
                };

                Console.Write($"{Format(size)}: Span.CopyTo into shared memory ... ");
                double floor = MemcpyGigabytesPerSecond(size, iterations);
                Console.Write($"{floor:0.0} GB/s; OffloadRpc one-way ... ");
                double gbps = await OneWayGigabytesPerSecondAsync(connection, size, iterations, TransferMode.Copy, CachePolicy.Inject);
                Console.WriteLine($"{gbps:0.0} GB/s");
                bool? met = size == 64 << 20 ? gbps >= 0.8 * floor : null;
                rows.Add(new Row("one-way copy+inject", size, gbps, "GB/s", floor, "Span.CopyTo", gbps / floor, size == 64 << 20 ? ">= 0.8x floor" : string.Empty, met));
                foreach ((TransferMode mode, CachePolicy cache) in new[] { (TransferMode.Copy, CachePolicy.Bypass), (TransferMode.Offload, CachePolicy.Inject), (TransferMode.Hybrid, CachePolicy.Inject), (TransferMode.Hybrid, CachePolicy.Bypass), (TransferMode.Auto, CachePolicy.Auto) })
                {
                    double modeGbps = await OneWayGigabytesPerSecondAsync(connection, size, iterations, mode, cache);
                    rows.Add(new Row($"one-way {mode.ToString().ToLowerInvariant()}+{cache.ToString().ToLowerInvariant()}", size, modeGbps, "GB/s", floor, "Span.CopyTo", modeGbps / floor, string.Empty, null));
                }
            }
        }
        finally
        {
            server.StandardInput.Close();
            if (!server.WaitForExit(10_000))
            {
                server.Kill();
            }
        }

        PrintTable(rows);
        if (jsonPath is not null)
        {
            await File.WriteAllTextAsync(jsonPath, JsonSerializer.Serialize(rows, new JsonSerializerOptions { WriteIndented = true }));
            Console.WriteLine($"wrote {jsonPath}");
        }

        return 0;
    }

    private static async Task VerifyAsync(RpcConnection connection)
    {
        Console.Write("verifying content end to end (checksums, 0 B .. 256 MiB) ... ");
        foreach (int size in new[] { 0, 1, 64, 4096, 1 << 20, 64 << 20, 256 << 20 })
        {
            byte[] payload = GC.AllocateUninitializedArray<byte>(size);
            Checksum64.Fill(payload, (ulong)size);
            using RpcReply reply = await connection.CallAsync(PeerMethods.Checksum, default, [OutboundPayload.Copy(payload)]);
            if (BinaryPrimitives.ReadUInt64LittleEndian(reply.Body) != Checksum64.Compute(payload))
            {
                throw new InvalidOperationException($"checksum mismatch at {size} bytes");
            }
        }

        Console.WriteLine("ok");
    }

    private static async Task<long[]> RoundTripsAsync(RpcConnection connection, int bodySize, int calls)
    {
        byte[] body = new byte[bodySize];
        for (int i = 0; i < 20_000; i++)
        {
            using RpcReply warm = await connection.CallAsync(PeerMethods.Echo, body, default);
        }

        long[] latencies = new long[calls];
        for (int i = 0; i < calls; i++)
        {
            long start = Stopwatch.GetTimestamp();
            using RpcReply reply = await connection.CallAsync(PeerMethods.Echo, body, default);
            latencies[i] = Stopwatch.GetTimestamp() - start;
        }

        return latencies;
    }

    private static async Task<double> OneWayGigabytesPerSecondAsync(RpcConnection connection, int size, int iterations, TransferMode mode, CachePolicy cache)
    {
        byte[] payload = GC.AllocateUninitializedArray<byte>(size);
        Checksum64.Fill(payload, 1);
        var times = new long[iterations];
        for (int i = -3; i < iterations; i++)
        {
            long start = Stopwatch.GetTimestamp();
            using RpcReply reply = await connection.CallAsync(PeerMethods.Touch, default, [OutboundPayload.Copy(payload, mode, cache)]);
            long elapsed = Stopwatch.GetTimestamp() - start;
            if (i >= 0)
            {
                times[i] = elapsed;
            }
        }

        return size / (Percentile(times, 0.5) / Stopwatch.Frequency) / 1e9;
    }

    private static unsafe double MemcpyGigabytesPerSecond(int size, int iterations)
    {
        byte[] source = GC.AllocateUninitializedArray<byte>(size);
        Checksum64.Fill(source, 2);
        SharedMemorySegment destination = SharedMemorySegment.Create(0, Math.Max(size, 4096), "offloadrpc-memcpy-floor", populate: true);
        try
        {
            var target = new Span<byte>(destination.Base, size);
            var times = new long[iterations];
            for (int i = -3; i < iterations; i++)
            {
                long start = Stopwatch.GetTimestamp();
                source.AsSpan().CopyTo(target);
                long elapsed = Stopwatch.GetTimestamp() - start;
                if (i >= 0)
                {
                    times[i] = elapsed;
                }
            }

            return size / (Percentile(times, 0.5) / Stopwatch.Frequency) / 1e9;
        }
        finally
        {
            destination.Dispose();
        }
    }

    internal static double Percentile(IEnumerable<long> values, double p)
    {
        long[] sorted = [.. values];
        Array.Sort(sorted);
        return sorted[Math.Min(sorted.Length - 1, (int)(p * sorted.Length))];
    }

    private static double Percentile(double[] values, double p)
    {
        double[] sorted = (double[])values.Clone();
        Array.Sort(sorted);
        return sorted[Math.Min(sorted.Length - 1, (int)(p * sorted.Length))];
    }

    private static void PrintTable(List<Row> rows)
    {
        Console.WriteLine();
        Console.WriteLine($"{"measure",-22} {"size",8} {"OffloadRpc",14} {"floor",14} {"floor is",-12} {"ratio",7}  target");
        Console.WriteLine(new string('-', 96));
        foreach (Row row in rows)
        {
            string verdict = row.TargetMet switch { true => "met", false => "MISSED", null => string.Empty };
            Console.WriteLine($"{row.Measure,-22} {Format(row.Bytes),8} {row.Value,9:0.0} {row.Unit,-4} {row.Floor,9:0.0} {row.Unit,-4} {row.FloorName,-12} {row.Ratio,6:0.00}x  {row.Target} {verdict}");
        }
    }

    private static string Format(long bytes) => bytes switch
    {
        >= 1 << 20 => $"{bytes >> 20} MiB",
        >= 1 << 10 => $"{bytes >> 10} KiB",
        _ => $"{bytes} B",
    };

    private static string CpuModel()
    {
        try
        {
            string? line = File.ReadLines("/proc/cpuinfo").FirstOrDefault(l => l.StartsWith("model name", StringComparison.Ordinal));
            return line is null ? "unknown CPU" : line[(line.IndexOf(':') + 1)..].Trim();
        }
        catch (IOException)
        {
            return "unknown CPU";
        }
    }

    private sealed record Row(string Measure, long Bytes, double Value, string Unit, double Floor, string FloorName, double Ratio, string Target, bool? TargetMet);
}
