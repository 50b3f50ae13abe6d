using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using System.Text.Json.Serialization;
using OffloadRpc;
using Spectre.Console;

namespace ImagePipeline;

/// <summary>One row of the results table (and of the --json file).</summary>
internal sealed record ResultRow(
    [property: JsonPropertyName("workload")] string Workload,
    [property: JsonPropertyName("bytes")] long Bytes,
    [property: JsonPropertyName("calls")] int Calls,
    [property: JsonPropertyName("calls_per_s")] double CallsPerSecond,
    [property: JsonPropertyName("gbps")] double GigabytesPerSecond,
    [property: JsonPropertyName("p50_us")] double P50Microseconds,
    [property: JsonPropertyName("p99_us")] double P99Microseconds);

/// <summary>The client role: starts the worker, verifies every workload against a local reference, then measures.</summary>
internal static class Client
{
    private const int FrameWidth = 3840;
    private const int FrameHeight = 2160;
    private const int FrameBytes = FrameWidth * FrameHeight * 3;
    private const int BatchImages = 256;
    private const int BatchChannels = 3;
    private const int BatchSide = 224;
    private const int BatchValues = BatchImages * BatchChannels * BatchSide * BatchSide;
    private const long BatchBytes = BatchValues * (long)sizeof(float);

    /// <summary>Slower than Spectre's default (100 ms): on two cores every redraw preempts one of the two threads that spin on each other.</summary>
    private static readonly TimeSpan RefreshRate = TimeSpan.FromMilliseconds(500);

    private static readonly int ThumbnailBytes = Kernels.ThumbnailBytes(FrameWidth, FrameHeight);

    /// <summary>Calls per workload: (warm-up, measured).</summary>
    private sealed record Plan(int PingWarmup, int Pings, int FrameWarmup, int Frames, int BatchWarmup, int Batches);

    private static readonly Plan Full = new(PingWarmup: 50_000, Pings: 1_000_000, FrameWarmup: 10, Frames: 1_000, BatchWarmup: 5, Batches: 300);
    private static readonly Plan Quick = new(PingWarmup: 10_000, Pings: 100_000, FrameWarmup: 3, Frames: 100, BatchWarmup: 2, Batches: 30);

    public static async Task<int> RunAsync(bool quick, string? jsonPath, bool grpc = false)
    {
        Plan plan = quick ? Quick : Full;
        string endpoint = $"imagepipeline-{Environment.ProcessId}";
        AnsiConsole.MarkupLine($"[bold]ImagePipeline[/]: typed OffloadRpc between two processes ({(quick ? "quick" : "full")} run, {Environment.ProcessorCount} cores, endpoint {endpoint})");

        await using WorkerProcess worker = WorkerProcess.Start(endpoint, grpc);

        // Generate the inputs while the worker starts.
        var generate = Stopwatch.StartNew();
        byte[] frame = GC.AllocateUninitializedArray<byte>(FrameBytes);
        Kernels.Render(frame, FrameWidth, FrameHeight, frameIndex: 0);
        float[] batch = GC.AllocateUninitializedArray<float>(BatchValues);
        Kernels.FillBatch(batch, BatchImages, BatchChannels, BatchSide, BatchSide, seed: 0x2545F4914F6CDD1DUL);
        generate.Stop();

        string? address = await worker.WaitReadyAsync(TimeSpan.FromSeconds(30));
        if (!grpc)
        {
            await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(endpoint);
            return await MeasureOnAsync(connection, plan, frame, batch, generate.Elapsed, jsonPath);
        }

        // The worker serves both ways. First over gRPC on 127.0.0.1 (the switch off), then the same client
        // given the same address with the switch on: the server is on this host, so it takes shared memory.
        string http = address ?? throw new InvalidOperationException("The worker printed no gRPC address.");
        int exit = 0;
        foreach (bool preferSharedMemory in new[] { false, true })
        {
            await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(http, new OffloadRpcOptions { PreferSharedMemory = preferSharedMemory });
            AnsiConsole.MarkupLine($"[bold]{Markup.Escape(http)}[/] with PreferSharedMemory = {preferSharedMemory}: calls go over [bold]{(connection.UsesSharedMemory ? "shared memory" : "gRPC (HTTP/2 on 127.0.0.1)")}[/]");
            string? json = jsonPath is null ? null : Path.ChangeExtension(jsonPath, null) + (connection.UsesSharedMemory ? "-shared-memory" : "-grpc") + ".json";
            exit |= await MeasureOnAsync(connection, connection.UsesSharedMemory ? plan : GrpcPlan, frame, batch, generate.Elapsed, json);
        }

        return exit;
    }

    /// <summary>
    /// Fewer calls over gRPC, which is 5 to 60x slower per call than shared memory on one host; enough pings
    /// first (about a second) for the JIT to have compiled both stacks' hot paths at their final tier.
    /// </summary>
    private static readonly Plan GrpcPlan = new(PingWarmup: 10_000, Pings: 10_000, FrameWarmup: 2, Frames: 30, BatchWarmup: 1, Batches: 5);

    private static async Task<int> MeasureOnAsync(OffloadRpcConnection connection, Plan plan, byte[] frame, float[] batch, TimeSpan generated, string? jsonPath)
    {
        IImageWorker service = connection.GetService<IImageWorker>();
        string worker = connection.UsesSharedMemory ? $"worker process {connection.PeerProcessId}" : "worker over gRPC"; // gRPC verifies no pid
        AnsiConsole.MarkupLine($"{worker} ready; inputs generated in {generated.TotalMilliseconds:0} ms " +
            $"(4K frame {FormatBytes(FrameBytes)}, batch {BatchImages}x{BatchChannels}x{BatchSide}x{BatchSide} fp32 {FormatBytes(BatchBytes)})");

        if (!await VerifyAsync(connection, service, frame, batch))
        {
            AnsiConsole.MarkupLine("[red]FAILED[/]: the worker's results differ from the local reference; nothing was timed.");
            return 1;
        }

        var rows = new List<ResultRow>();
        double renderMilliseconds = 0;
        async Task MeasureAllAsync(Func<string, int, ProgressTask> addTask, Action<ResultRow> finished)
        {
            ProgressTask pingTask = addTask("ping (0 B)", plan.Pings);
            ProgressTask histogramTask = addTask("4K frame histogram", plan.Frames);
            ProgressTask statsTask = addTask("batch stats (256x3x224x224 fp32)", plan.Batches);
            ProgressTask thumbnailTask = addTask("4K thumbnail via SharedBuffer", plan.Frames);
            ProgressTask streamTask = addTask("4K frame stream (worker renders)", plan.Frames);

            rows.Add(await MeasurePingAsync(service, plan, pingTask));
            finished(rows[^1]);
            rows.Add(await MeasureHistogramAsync(service, frame, plan, histogramTask));
            finished(rows[^1]);
            rows.Add(await MeasureStatsAsync(service, batch, plan, statsTask));
            finished(rows[^1]);
            (ResultRow thumbnails, renderMilliseconds) = await MeasureThumbnailAsync(connection, service, plan, thumbnailTask);
            rows.Add(thumbnails);
            finished(rows[^1]);
            rows.Add(await MeasureStreamAsync(service, plan, streamTask));
            finished(rows[^1]);
        }

        if (AnsiConsole.Profile.Capabilities.Interactive)
        {
            Progress progress = AnsiConsole.Progress()
                .AutoClear(false)
                .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new ElapsedTimeColumn());
            progress.RefreshRate = RefreshRate;
            await progress.StartAsync(context => MeasureAllAsync((name, calls) => context.AddTask(name, autoStart: false, maxValue: calls), _ => { }));
        }
        else
        {
            // Not a terminal (a pipe, a log file): no live display, one line per finished workload instead.
            int id = 0;
            await MeasureAllAsync(
                (name, calls) => new ProgressTask(id++, name, calls, autoStart: false),
                row => AnsiConsole.MarkupLine($"measured {Markup.Escape(row.Workload)}: {row.Calls:N0} calls, {row.CallsPerSecond:N1} calls/s"));
        }

        PrintTable(rows, renderMilliseconds, connection.UsesSharedMemory);
        if (jsonPath is not null)
        {
            await File.WriteAllTextAsync(jsonPath, JsonSerializer.Serialize(rows, new JsonSerializerOptions { WriteIndented = true }));
            AnsiConsole.MarkupLine($"rows written to {Markup.Escape(jsonPath)}");
        }

        return 0;
    }

    // ---- correctness first ----

    private static async Task<bool> VerifyAsync(OffloadRpcConnection connection, IImageWorker service, byte[] frame, float[] batch)
    {
        bool ok = true;

        int pong = await service.PingAsync(41);
        ok &= Report("ping", pong == 42, $"PingAsync(41) = {pong}");

        HistogramResult remote = await service.HistogramAsync(frame, FrameWidth, FrameHeight);
        HistogramResult local = Kernels.ReferenceHistogram(frame, FrameWidth, FrameHeight);
        bool histogramsEqual = remote.Red.AsSpan().SequenceEqual(local.Red) && remote.Green.AsSpan().SequenceEqual(local.Green) && remote.Blue.AsSpan().SequenceEqual(local.Blue);
        ok &= Report(
            "histogram",
            histogramsEqual && remote.Pixels == local.Pixels && remote.MeanLuminance == local.MeanLuminance,
            $"{remote.Pixels:N0} pixels, 3x256 bins {(histogramsEqual ? "equal" : "DIFFER")}, mean luminance {remote.MeanLuminance:F4} (local {local.MeanLuminance:F4})");

        ChannelStats remoteStats = await service.NormalizeStatsAsync(batch, BatchImages, BatchChannels, BatchSide, BatchSide);
        ChannelStats localStats = Kernels.ReferenceNormalizeStats(batch, BatchImages, BatchChannels, BatchSide, BatchSide);
        bool statsShaped = remoteStats.Mean.Length == BatchChannels && remoteStats.Std.Length == BatchChannels && remoteStats.ValuesPerChannel == localStats.ValuesPerChannel;
        double worst = statsShaped ? 0 : double.PositiveInfinity;
        for (int c = 0; statsShaped && c < BatchChannels; c++)
        {
            // Math.Max propagates NaN, so a NaN from the worker fails the check.
            worst = Math.Max(worst, Math.Max(RelativeDifference(remoteStats.Mean[c], localStats.Mean[c]), RelativeDifference(remoteStats.Std[c], localStats.Std[c])));
        }

        ok &= Report(
            "batch stats",
            statsShaped && worst <= 1e-3,
            $"mean {Join(remoteStats.Mean)}, std {Join(remoteStats.Std)}; max rel. diff {worst:0.0e0} (limit 1e-3)");

        SharedBuffer lease = connection.Rent(FrameBytes);
        Kernels.Render(lease.Span, FrameWidth, FrameHeight, frameIndex: 1);
        byte[] expected = Kernels.ReferenceThumbnail(lease.Span, FrameWidth, FrameHeight);
        using (SharedBuffer thumbnail = await service.ThumbnailAsync(lease, FrameWidth, FrameHeight))
        {
            ok &= Report(
                "thumbnail",
                !lease.IsValid && thumbnail.Length == expected.Length && thumbnail.Span.SequenceEqual(expected),
                $"{FrameWidth / Kernels.ThumbnailScale}x{FrameHeight / Kernels.ThumbnailScale} RGB, {thumbnail.Length:N0} bytes {(thumbnail.Span.SequenceEqual(expected) ? "equal" : "DIFFER")}; frame lease moved: {!lease.IsValid}");
        }

        // The streaming stage: frames rendered by the worker arrive in order, each equal to the local render.
        int streamed = 0;
        bool framesEqual = true;
        byte[] reference = GC.AllocateUninitializedArray<byte>(FrameBytes);
        await foreach (SharedBuffer streamedFrame in service.RenderStreamAsync(3, FrameWidth, FrameHeight, firstFrame: 7))
        {
            using (streamedFrame)
            {
                Kernels.Render(reference, FrameWidth, FrameHeight, 7 + streamed);
                framesEqual &= streamedFrame.Length == FrameBytes && streamedFrame.Span.SequenceEqual(reference);
                streamed++;
            }
        }

        ok &= Report("frame stream", streamed == 3 && framesEqual, $"{streamed} frames streamed back as leases, {(framesEqual ? "equal" : "DIFFERENT")} to the local render");

        // A bad call fails as that call's exception and leaves the connection serving.
        string failure = "no exception";
        try
        {
            await service.HistogramAsync(frame.AsMemory(0, 300), FrameWidth, FrameHeight);
        }
        catch (RemoteInvocationException ex)
        {
            failure = ex.RemoteExceptionType;
        }

        bool servesOn = await service.PingAsync(1) == 2;
        ok &= Report("bad call", failure == typeof(ArgumentException).FullName && servesOn, $"a 300-byte 'frame' fails with {failure}; the connection serves on: {servesOn}");
        return ok;
    }

    private static double RelativeDifference(double actual, double expected) =>
        actual == expected ? 0 : Math.Abs(actual - expected) / Math.Max(Math.Abs(actual), Math.Abs(expected));

    private static string Join(double[] values) => string.Join("/", values.Select(v => v.ToString("F5", CultureInfo.InvariantCulture)));

    private static bool Report(string what, bool passed, string detail)
    {
        AnsiConsole.MarkupLine($"verify {what,-12} {(passed ? "[green]ok[/]" : "[red]MISMATCH[/]")}  {Markup.Escape(detail)}");
        return passed;
    }

    // ---- measurement: one loop per workload, each call timed ----

    private static async Task<ResultRow> MeasurePingAsync(IImageWorker service, Plan plan, ProgressTask task)
    {
        for (int i = 0; i < plan.PingWarmup; i++)
        {
            await service.PingAsync(i);
        }

        task.StartTask();
        long[] latencies = new long[plan.Pings];
        long start = Stopwatch.GetTimestamp();
        for (int i = 0; i < latencies.Length; i++)
        {
            long before = Stopwatch.GetTimestamp();
            int reply = await service.PingAsync(i);
            latencies[i] = Stopwatch.GetTimestamp() - before;
            if (reply != i + 1)
            {
                throw new InvalidOperationException($"PingAsync({i}) returned {reply}.");
            }

            if ((i & 4095) == 4095)
            {
                task.Value = i + 1;
            }
        }

        long wall = Stopwatch.GetTimestamp() - start;
        task.Value = latencies.Length;
        task.StopTask();
        return Row("ping", 0, latencies, wall);
    }

    private static async Task<ResultRow> MeasureHistogramAsync(IImageWorker service, byte[] frame, Plan plan, ProgressTask task)
    {
        ReadOnlyMemory<byte> memory = frame;
        for (int i = 0; i < plan.FrameWarmup; i++)
        {
            await service.HistogramAsync(memory, FrameWidth, FrameHeight);
        }

        task.StartTask();
        long[] latencies = new long[plan.Frames];
        long start = Stopwatch.GetTimestamp();
        for (int i = 0; i < latencies.Length; i++)
        {
            long before = Stopwatch.GetTimestamp();
            HistogramResult result = await service.HistogramAsync(memory, FrameWidth, FrameHeight);
            latencies[i] = Stopwatch.GetTimestamp() - before;
            if (result.Pixels != (long)FrameWidth * FrameHeight)
            {
                throw new InvalidOperationException($"The histogram covers {result.Pixels} pixels.");
            }

            task.Increment(1);
        }

        long wall = Stopwatch.GetTimestamp() - start;
        task.StopTask();
        return Row("4K frame histogram", FrameBytes, latencies, wall);
    }

    private static async Task<ResultRow> MeasureStatsAsync(IImageWorker service, float[] batch, Plan plan, ProgressTask task)
    {
        ReadOnlyMemory<float> memory = batch;
        for (int i = 0; i < plan.BatchWarmup; i++)
        {
            await service.NormalizeStatsAsync(memory, BatchImages, BatchChannels, BatchSide, BatchSide);
        }

        task.StartTask();
        long[] latencies = new long[plan.Batches];
        long start = Stopwatch.GetTimestamp();
        for (int i = 0; i < latencies.Length; i++)
        {
            long before = Stopwatch.GetTimestamp();
            ChannelStats result = await service.NormalizeStatsAsync(memory, BatchImages, BatchChannels, BatchSide, BatchSide);
            latencies[i] = Stopwatch.GetTimestamp() - before;
            if (result.ValuesPerChannel != (long)BatchImages * BatchSide * BatchSide)
            {
                throw new InvalidOperationException($"The statistics cover {result.ValuesPerChannel} values per channel.");
            }

            task.Increment(1);
        }

        long wall = Stopwatch.GetTimestamp() - start;
        task.StopTask();
        return Row("batch stats", BatchBytes, latencies, wall);
    }

    /// <summary>
    /// Each iteration rents a frame from the connection (shared memory; ordinary memory over gRPC), renders into
    /// it in place (this replaces the copy the other workloads make), moves it to the worker and gets the
    /// thumbnail lease back (without a copy over shared memory, copied over gRPC): all timed.
    /// </summary>
    private static async Task<(ResultRow Row, double RenderMilliseconds)> MeasureThumbnailAsync(OffloadRpcConnection connection, IImageWorker service, Plan plan, ProgressTask task)
    {
        for (int i = 0; i < plan.FrameWarmup; i++)
        {
            SharedBuffer frame = connection.Rent(FrameBytes);
            Kernels.Render(frame.Span, FrameWidth, FrameHeight, i);
            using SharedBuffer thumbnail = await service.ThumbnailAsync(frame, FrameWidth, FrameHeight);
        }

        task.StartTask();
        long[] latencies = new long[plan.Frames];
        long rendering = 0;
        long start = Stopwatch.GetTimestamp();
        for (int i = 0; i < latencies.Length; i++)
        {
            long before = Stopwatch.GetTimestamp();
            SharedBuffer frame = connection.Rent(FrameBytes);
            Kernels.Render(frame.Span, FrameWidth, FrameHeight, i);
            rendering += Stopwatch.GetTimestamp() - before;
            using (SharedBuffer thumbnail = await service.ThumbnailAsync(frame, FrameWidth, FrameHeight))
            {
                if (thumbnail.Length != ThumbnailBytes)
                {
                    throw new InvalidOperationException($"The thumbnail has {thumbnail.Length} bytes.");
                }
            }

            latencies[i] = Stopwatch.GetTimestamp() - before;
            task.Increment(1);
        }

        long wall = Stopwatch.GetTimestamp() - start;
        task.StopTask();
        return (Row("4K thumbnail (SharedBuffer)", FrameBytes + (long)ThumbnailBytes, latencies, wall), rendering * 1000.0 / Stopwatch.Frequency / latencies.Length);
    }

    /// <summary>
    /// The streaming stage: one call, the worker renders every frame into a lease (shared memory; ordinary memory over gRPC) and streams it back while
    /// the client consumes the previous ones (a histogram of each, here). Latency per frame: from asking for the next
    /// frame to having it (render and transfer overlap with the client's work, up to StreamWindow frames ahead).
    /// </summary>
    private static async Task<ResultRow> MeasureStreamAsync(IImageWorker service, Plan plan, ProgressTask task)
    {
        long[] latencies = new long[plan.Frames];
        int index = -plan.FrameWarmup;
        long start = 0;
        long before = Stopwatch.GetTimestamp();
        await foreach (SharedBuffer frame in service.RenderStreamAsync(plan.FrameWarmup + plan.Frames, FrameWidth, FrameHeight, firstFrame: 0))
        {
            long arrived = Stopwatch.GetTimestamp();
            using (frame)
            {
                if (index == 0)
                {
                    task.StartTask();
                    start = before;
                }

                if (index >= 0)
                {
                    latencies[index] = arrived - before;
                    task.Increment(1);
                }

                HistogramResult histogram = Kernels.Histogram(frame.Span, FrameWidth, FrameHeight); // the consumer's work
                if (histogram.Pixels != (long)FrameWidth * FrameHeight)
                {
                    throw new InvalidOperationException($"A streamed frame's histogram covers {histogram.Pixels} pixels.");
                }
            }

            index++;
            before = Stopwatch.GetTimestamp();
        }

        long wall = Stopwatch.GetTimestamp() - start;
        task.StopTask();
        return Row("4K frame stream (SharedBuffer items)", FrameBytes, latencies, wall);
    }

    private static ResultRow Row(string workload, long bytes, long[] latencies, long wallTicks)
    {
        double seconds = (double)wallTicks / Stopwatch.Frequency;
        Array.Sort(latencies);
        return new ResultRow(
            workload,
            bytes,
            latencies.Length,
            Math.Round(latencies.Length / seconds, 1),
            Math.Round(bytes * (double)latencies.Length / seconds / 1e9, 3),
            Math.Round(Percentile(latencies, 0.50), 3),
            Math.Round(Percentile(latencies, 0.99), 3));
    }

    /// <summary>Nearest-rank percentile of sorted timestamps, in microseconds.</summary>
    private static double Percentile(long[] sorted, double p)
    {
        int rank = Math.Clamp((int)Math.Ceiling(p * sorted.Length) - 1, 0, sorted.Length - 1);
        return sorted[rank] * 1e6 / Stopwatch.Frequency;
    }

    // ---- output ----

    private static void PrintTable(List<ResultRow> rows, double renderMilliseconds, bool sharedMemory)
    {
        var table = new Table()
            .Title($"[bold]ImagePipeline: client -> worker process over OffloadRpc ({(sharedMemory ? "shared memory" : "gRPC, HTTP/2 on 127.0.0.1")})[/]")
            .AddColumn("workload")
            .AddColumn(new TableColumn("payload size").RightAligned())
            .AddColumn(new TableColumn("calls").RightAligned())
            .AddColumn(new TableColumn("calls/s").RightAligned())
            .AddColumn(new TableColumn("GB/s").RightAligned())
            .AddColumn(new TableColumn("p50 latency").RightAligned())
            .AddColumn(new TableColumn("p99 latency").RightAligned());
        foreach (ResultRow row in rows)
        {
            table.AddRow(
                Markup.Escape(row.Workload),
                row.Workload.StartsWith("4K thumbnail", StringComparison.Ordinal) ? $"{FormatBytes(FrameBytes)} + {FormatBytes(ThumbnailBytes)}" : FormatBytes(row.Bytes),
                row.Calls.ToString("N0", CultureInfo.InvariantCulture),
                row.CallsPerSecond.ToString(row.CallsPerSecond >= 1000 ? "N0" : "N1", CultureInfo.InvariantCulture),
                row.Bytes == 0 ? "-" : row.GigabytesPerSecond.ToString("F2", CultureInfo.InvariantCulture),
                FormatMicroseconds(row.P50Microseconds),
                FormatMicroseconds(row.P99Microseconds));
        }

        string render = renderMilliseconds.ToString("F1", CultureInfo.InvariantCulture);
        table.Caption(sharedMemory
            ? "GB/s = payload bytes x calls / wall time, work included. Latency: one call as the caller sees it " +
              $"(copy into shared memory, the worker's work, the reply). Thumbnail: the frame is rendered in place in shared memory " +
              $"({render} ms per frame, included) and moved both ways without a copy. " +
              "Frame stream: one call; the worker renders each frame into shared memory and streams it back as a lease while the client " +
              "computes the previous frame's histogram; calls = frames, latency = waiting for the next frame."
            : "GB/s = payload bytes x calls / wall time, work included. Latency: one call as the caller sees it " +
              "(the request's gRPC messages over HTTP/2, the worker's work, the reply's). Over gRPC a SharedBuffer is ordinary memory: " +
              $"the thumbnail's frame is rendered into one ({render} ms per frame, included), copied into the request, and the thumbnail " +
              "copied out of the reply. Frame stream: one call; the worker renders each frame and streams it back as gRPC messages, " +
              "copied into a buffer the client owns, while the client computes the previous frame's histogram; calls = frames, latency = " +
              "waiting for the next frame.");
        AnsiConsole.Write(table);
    }

    private static string FormatBytes(long bytes) => bytes switch
    {
        0 => "0 B",
        < 1_000_000 => (bytes / 1e3).ToString("0.#", CultureInfo.InvariantCulture) + " kB",
        _ => (bytes / 1e6).ToString("0.0", CultureInfo.InvariantCulture) + " MB",
    };

    private static string FormatMicroseconds(double us) => us switch
    {
        < 1000 => us.ToString("0.0", CultureInfo.InvariantCulture) + " µs",
        _ => (us / 1000).ToString("0.00", CultureInfo.InvariantCulture) + " ms",
    };
}
