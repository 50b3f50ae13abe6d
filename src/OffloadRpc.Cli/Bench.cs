using System.Buffers.Binary;
using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text.Json;
using System.Text.Json.Serialization;
using OffloadRpc.Engines;
using OffloadRpc.Transport;
using Spectre.Console;

namespace OffloadRpc.Cli;

/// <summary>One row of `offloadrpc bench`.</summary>
internal sealed record BenchRow(
    [property: JsonPropertyName("mode")] string Mode,
    [property: JsonPropertyName("cache")] string Cache,
    [property: JsonPropertyName("bytes")] long Bytes,
    [property: JsonPropertyName("p50_us")] double P50Microseconds,
    [property: JsonPropertyName("p99_us")] double P99Microseconds,
    [property: JsonPropertyName("gbps")] double Gbps,
    [property: JsonPropertyName("caller_cpu_us")] double CallerCpuMicroseconds,
    [property: JsonPropertyName("chosen")] string? Chosen,
    [property: JsonPropertyName("first_chunk_us")] double? FirstChunkMicroseconds = null);

[JsonSerializable(typeof(List<BenchRow>))]
[JsonSourceGenerationOptions(WriteIndented = true, DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull)]
internal sealed partial class BenchJson : JsonSerializerContext
{
}

/// <summary>
/// `offloadrpc bench`: a server process and this client; per size and per mode x cache policy (and
/// Auto), round-trip latency p50/p99, throughput and the caller thread's CPU time per call; and, in
/// the same run, the floors: a raw two-process spin ping-pong and Span.CopyTo bandwidth per size.
/// </summary>
internal static partial class Bench
{
    private const int TouchMethod = 1;

    private static readonly long[] Sizes = [64, 4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20, 256 << 20];

    private static readonly (TransferMode Mode, CachePolicy Cache)[] Plans =
    [
        (TransferMode.Copy, CachePolicy.Inject),
        (TransferMode.Copy, CachePolicy.Bypass),
        (TransferMode.Offload, CachePolicy.Inject),
        (TransferMode.Offload, CachePolicy.Bypass),
        (TransferMode.Hybrid, CachePolicy.Inject),
        (TransferMode.Hybrid, CachePolicy.Bypass),
        (TransferMode.Pipelined, CachePolicy.Inject),
        (TransferMode.Pipelined, CachePolicy.Bypass),
        (TransferMode.Auto, CachePolicy.Auto),
    ];

    public static async Task<int> RunAsync(bool quick, string? jsonPath, string? plotPath)
    {
        var rows = new List<BenchRow>();
        AnsiConsole.MarkupLine($"offloadrpc bench{(quick ? " [grey](quick)[/]" : string.Empty)}: {Environment.ProcessorCount} cores, LLC {TransferPolicy.LastLevelCacheBytes >> 20} MiB, {WorkerCopyEngine.Shared.ThreadCount} copy worker(s), calibration: {(Calibration.Current is null ? "none (built-in Auto rules)" : "stored")}");

        double[] pingPong = PingPong.Measure(quick ? 200 : 1000, 1000, (pid, fd) => StartSelf("bench-pingpong", pid.ToString(CultureInfo.InvariantCulture), fd.ToString(CultureInfo.InvariantCulture)));
        rows.Add(new BenchRow("floor-pingpong", "-", 0, Percentile(pingPong, 0.5) / 1000, Percentile(pingPong, 0.99) / 1000, 0, 0, null));
        foreach (long size in Sizes)
        {
            (double p50, double p99, double gbps) = MemcpyFloor(size, Iterations(size, quick));
            rows.Add(new BenchRow("floor-memcpy", "inject", size, p50, p99, gbps, p50, null));
        }

        string endpoint = $"bench-{Environment.ProcessId}";
        using Process server = StartSelf("bench-server", endpoint);
        try
        {
            if (await server.StandardOutput.ReadLineAsync().WaitAsync(TimeSpan.FromSeconds(30)) != "READY")
            {
                throw new InvalidOperationException("the bench server did not start");
            }

            await using RpcConnection connection = await Handshake.ConnectAsync(endpoint, new TransportOptions(), [], null, CancellationToken.None);
            byte[] source = GC.AllocateUninitializedArray<byte>((int)Sizes[^1], pinned: true);
            Random.Shared.NextBytes(source);
            await AnsiConsole.Progress().AutoClear(true).StartAsync(async progress =>
            {
                ProgressTask task = progress.AddTask("measuring", maxValue: Sizes.Length);
                foreach (long size in Sizes)
                {
                    rows.AddRange(await MeasureAsync(connection, source.AsMemory(0, (int)size), Iterations(size, quick) / Plans.Length + 3));
                    task.Increment(1);
                }
            });
        }
        finally
        {
            server.StandardInput.Close();
            if (!server.WaitForExit(10_000))
            {
                server.Kill();
            }
        }

        Print(rows);
        if (jsonPath is not null)
        {
            await File.WriteAllTextAsync(jsonPath, JsonSerializer.Serialize(rows, BenchJson.Default.ListBenchRow));
            AnsiConsole.MarkupLine($"wrote {Markup.Escape(jsonPath)}");
        }

        if (plotPath is not null)
        {
            Plot(rows, plotPath);
            AnsiConsole.MarkupLine($"wrote {Markup.Escape(plotPath)}");
        }

        return 0;
    }

    private static int Iterations(long size, bool quick) => (int)Math.Clamp((quick ? 1L << 30 : 4L << 30) / Math.Max(size, 4096), 5, quick ? 5_000 : 50_000);

    /// <summary>
    /// Measures every plan at one size, interleaved in a shuffled order each round (call 1 of each plan,
    /// then call 2 of each, ...), so that drift in the machine's load over time, and what one plan leaves
    /// behind for the next, fall on every plan alike. GB/s is the payload over the median call time.
    /// </summary>
    private static async Task<BenchRow[]> MeasureAsync(RpcConnection connection, ReadOnlyMemory<byte> payload, int iterations)
    {
        int plans = Plans.Length;
        var latencies = new double[plans][];
        var firstChunks = new double[plans][];
        var cpu = new double[plans];
        for (int p = 0; p < plans; p++)
        {
            latencies[p] = new double[iterations];
            firstChunks[p] = new double[iterations];
        }

        var random = new Random(42);
        int[] order = Enumerable.Range(0, plans).ToArray();
        for (int i = -Math.Min(iterations, 10); i < iterations; i++)
        {
            random.Shuffle(order); // no plan always follows the same one: what a plan leaves behind (a woken worker, a cold block) falls on all alike
            foreach (int p in order)
            {
                (TransferMode mode, CachePolicy cache) = Plans[p];
                long start = Stopwatch.GetTimestamp();
                long cpuStart = ProcessCpu.ThreadNanoseconds;
                ValueTask<RpcReply> call = connection.CallAsync(TouchMethod, default, [OutboundPayload.Copy(payload, mode, cache)]);
                long cpuSpent = ProcessCpu.ThreadNanoseconds - cpuStart; // the caller's share: everything done before the call could be awaited
                long firstChunk;
                using (RpcReply reply = await call.ConfigureAwait(false))
                {
                    firstChunk = BinaryPrimitives.ReadInt64LittleEndian(reply.Body[8..]); // the server's monotonic clock, the same as ours
                }

                if (i >= 0)
                {
                    latencies[p][i] = Microseconds(Stopwatch.GetTimestamp() - start);
                    firstChunks[p][i] = Microseconds(firstChunk - start);
                    cpu[p] += cpuSpent / 1000.0;
                }
            }
        }

        var rows = new BenchRow[plans];
        for (int p = 0; p < plans; p++)
        {
            (TransferMode mode, CachePolicy cache) = Plans[p];
            TransferPlan chosen = TransferPolicy.Resolve(payload.Length, mode, cache);
            double p50 = Percentile(latencies[p], 0.5);
            rows[p] = new BenchRow(
                Name(mode),
                Name(cache),
                payload.Length,
                p50,
                Percentile(latencies[p], 0.99),
                payload.Length / (p50 / 1e6) / 1e9,
                cpu[p] / iterations,
                mode == TransferMode.Auto ? $"{Name(chosen.Mode)}+{Name(chosen.Cache)}" : null,
                mode == TransferMode.Pipelined ? Percentile(firstChunks[p], 0.5) : null);
        }

        return rows;
    }

    private static unsafe (double P50, double P99, double Gbps) MemcpyFloor(long size, int iterations)
    {
        byte[] source = GC.AllocateUninitializedArray<byte>((int)size, pinned: true);
        Random.Shared.NextBytes(source);
        SharedMemorySegment destination = SharedMemorySegment.Create(0, Math.Max(size, 4096), "offloadrpc-bench-floor", populate: true);
        try
        {
            var target = new Span<byte>(destination.Base, (int)size);
            var times = new double[iterations];
            for (int i = -3; i < iterations; i++)
            {
                long start = Stopwatch.GetTimestamp();
                source.AsSpan().CopyTo(target);
                if (i >= 0)
                {
                    times[i] = Microseconds(Stopwatch.GetTimestamp() - start);
                }
            }

            double p50 = Percentile(times, 0.5);
            return (p50, Percentile(times, 0.99), size / (p50 / 1e6) / 1e9);
        }
        finally
        {
            destination.Dispose();
        }
    }

    private static void Print(List<BenchRow> rows)
    {
        var table = new Table().Border(TableBorder.Rounded).Title("[bold]OffloadRpc: one call per row, client -> server process[/]");
        foreach (string column in new[] { "size", "mode", "cache", "p50 us", "p99 us", "GB/s", "caller CPU us", "1st chunk us", "Auto chose" })
        {
            table.AddColumn(new TableColumn(column).RightAligned());
        }

        foreach (BenchRow row in rows)
        {
            table.AddRow(Calibrate.Size(row.Bytes), row.Mode, row.Cache, F(row.P50Microseconds), F(row.P99Microseconds), row.Gbps == 0 ? "-" : F(row.Gbps), F(row.CallerCpuMicroseconds), row.FirstChunkMicroseconds is { } first ? F(first) : string.Empty, row.Chosen ?? string.Empty);
        }

        AnsiConsole.Write(table);
    }

    private static void Plot(List<BenchRow> rows, string path)
    {
        var plot = new ScottPlot.Plot();
        foreach (IGrouping<string, BenchRow> series in rows.Where(r => r.Gbps > 0).GroupBy(r => r.Mode == "floor-memcpy" ? "memcpy floor" : $"{r.Mode}+{r.Cache}"))
        {
            BenchRow[] points = series.OrderBy(r => r.Bytes).ToArray();
            ScottPlot.Plottables.Scatter line = plot.Add.Scatter(points.Select(p => Math.Log10(p.Bytes)).ToArray(), points.Select(p => p.Gbps).ToArray());
            line.LegendText = series.Key;
            line.LineWidth = series.Key.StartsWith("auto", StringComparison.Ordinal) || series.Key.StartsWith("memcpy", StringComparison.Ordinal) ? 3 : 1.5f;
        }

        plot.Axes.Bottom.TickGenerator = new ScottPlot.TickGenerators.NumericAutomatic
        {
            LabelFormatter = value => Calibrate.Size((long)Math.Round(Math.Pow(10, value))),
        };
        plot.Title("OffloadRpc throughput per transfer mode");
        plot.XLabel("payload size (log)");
        plot.YLabel("GB/s");
        plot.ShowLegend(ScottPlot.Alignment.UpperLeft);
        plot.SavePng(path, 1000, 600);
    }

    /// <summary>
    /// The server side: reads the first and the last byte of each payload and answers (moving the bytes
    /// is what is measured); the calls of <c>--clients</c> go to <see cref="BenchClients.Serve"/>.
    /// </summary>
    public static async Task<int> ServeAsync(string endpoint)
    {
        await using var listener = new RpcListener(endpoint, new TransportOptions(), [], _ => new TouchHandler());
        listener.Start();
        Console.WriteLine("READY");
        await Task.Run(() => Console.In.ReadToEnd());
        return 0;
    }

    private sealed class TouchHandler : IRequestHandler
    {
        public ValueTask HandleAsync(IncomingCall call)
        {
            if (call.MethodId is BenchClients.SmallMethod or BenchClients.ChecksumMethod)
            {
                BenchClients.Serve(call);
                return ValueTask.CompletedTask;
            }

            long total = 0;
            long firstChunk = 0;
            for (int i = 0; i < call.PayloadCount; i++)
            {
                call.WaitForPayloadBytes(i, 1); // a pipelined payload: the first chunk has landed
                firstChunk = Stopwatch.GetTimestamp();
                using SharedBuffer lease = call.TakePayload(i); // and now all of it
                Span<byte> span = lease.Span;
                total += span.Length == 0 ? 0 : span.Length + (span[0] & 0) + (span[^1] & 0);
            }

            Span<byte> answer = stackalloc byte[16];
            BinaryPrimitives.WriteInt64LittleEndian(answer, total);
            BinaryPrimitives.WriteInt64LittleEndian(answer[8..], firstChunk == 0 ? Stopwatch.GetTimestamp() : firstChunk);
            call.Reply(answer);
            return ValueTask.CompletedTask;
        }
    }

    private static Process StartSelf(params string[] arguments) => Process.Start(SelfStartInfo(arguments))!;

    /// <summary>This tool started again with a hidden subcommand (the server, the ping-pong partner, a client of <c>--clients</c>), stdin and stdout redirected.</summary>
    internal static ProcessStartInfo SelfStartInfo(params string[] arguments)
    {
        var info = new ProcessStartInfo { UseShellExecute = false, RedirectStandardOutput = true, RedirectStandardInput = true, FileName = Environment.ProcessPath! };
        if (Path.GetFileName(info.FileName) is "dotnet")
        {
            info.ArgumentList.Add(typeof(Bench).Assembly.Location);
        }

        foreach (string argument in arguments)
        {
            info.ArgumentList.Add(argument);
        }

        return info;
    }

    /// <summary>Stopwatch ticks as microseconds, at least one tick (TimeSpan's 100 ns resolution would turn a 64-byte copy into zero).</summary>
    private static double Microseconds(long ticks) => Math.Max(1, ticks) * 1e6 / Stopwatch.Frequency;

    private static double Percentile(double[] values, double p)
    {
        double[] sorted = (double[])values.Clone();
        Array.Sort(sorted);
        return sorted[Math.Min(sorted.Length - 1, (int)(p * sorted.Length))];
    }

    private static string F(double value) => value.ToString(value < 10 ? "0.00" : "0.0", CultureInfo.InvariantCulture);

    private static string Name(TransferMode mode) => mode.ToString().ToLowerInvariant();

    private static string Name(CachePolicy cache) => cache.ToString().ToLowerInvariant();
}
