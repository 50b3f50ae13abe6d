using System.Diagnostics;
using System.Diagnostics.Metrics;
using System.Globalization;

namespace OffloadRpc.Benchmarks;

/// <summary>The typed service of the observed-path benchmark.</summary>
[OffloadService]
public interface IObservedBench
{
    ValueTask<int> AddAsync(int a, int b, CancellationToken ct = default);

    /// <summary>The server process's allocated bytes so far (GC.GetTotalAllocatedBytes).</summary>
    ValueTask<long> AllocatedBytesAsync(CancellationToken ct = default);

    /// <summary>Starts (true) or stops the server process's ActivityListener and MeterListener.</summary>
    ValueTask SetListeningAsync(bool listening, CancellationToken ct = default);
}

/// <summary>
/// The per-call cost of the observed path of a typed call, between this process and a server process,
/// side by side in one run: a plain call; with metadata (a header and a deadline, in a scope per call);
/// with a client and a server interceptor; with an ActivityListener and a MeterListener listening on
/// both sides (telemetry); and all of these at once. The variants take turns in short batches (each
/// round in another order), so the wake-up regime of a shared machine falls on all of them alike; one
/// server process serves them all (a second OffloadRpcServer in it has the server interceptor), and
/// its listeners listen only during the telemetry batches, as the client's do. Reports p50 and p99 per
/// call, p50 as a ratio to the plain call, and bytes allocated per call in each process.
/// </summary>
internal static class ObservedBenchmark
{
    private const string Header = "tenant";

    [Flags]
    private enum Features
    {
        None = 0,
        Metadata = 1,
        Interceptors = 2,
        Telemetry = 4,
    }

    private sealed record Variant(string Name, Features Features)
    {
        public List<long> Latencies { get; } = [];

        public long ClientBytes { get; set; }

        public long ServerBytes { get; set; }

        public long Calls { get; set; }

        public IObservedBench Service { get; set; } = null!;
    }

    public static async Task<int> RunAsync(bool quick)
    {
        int rounds = quick ? 60 : 200;
        int batch = 500;
        Variant[] variants =
        [
            new("plain", Features.None),
            new("metadata (header + deadline)", Features.Metadata),
            new("interceptors (client + server)", Features.Interceptors),
            new("telemetry (listeners on both sides)", Features.Telemetry),
            new("all of them", Features.Metadata | Features.Interceptors | Features.Telemetry),
        ];

        Console.WriteLine($"OffloadRpc observed-path benchmark{(quick ? " (quick)" : string.Empty)}: {Environment.ProcessorCount} cores, .NET {Environment.Version}; {rounds} rounds of {batch:N0} calls per variant");
        string endpoint = $"bench-observed-{Environment.ProcessId}";
        using Process server = BenchmarkProcess.StartSelf(["--serve-observed", endpoint]);
        OffloadRpcConnection? plain = null, intercepted = null;
        try
        {
            if (server.StandardOutput.ReadLine() != "READY")
            {
                throw new InvalidOperationException("the observed-benchmark server did not start");
            }

            var options = new OffloadRpcOptions();
            options.ClientInterceptors.Add(new PassThroughClientInterceptor());
            plain = await OffloadRpcConnection.ConnectAsync(endpoint);
            intercepted = await OffloadRpcConnection.ConnectAsync(endpoint + "-intercepted", options);
            foreach (Variant variant in variants)
            {
                variant.Service = (variant.Features.HasFlag(Features.Interceptors) ? intercepted : plain).GetService<IObservedBench>();
            }

            Console.Write("warming up ... ");
            foreach (Variant variant in variants)
            {
                for (int i = 0; i < 20; i++)
                {
                    await MeasureAsync(variant, batch, record: false);
                }
            }

            Console.WriteLine("ok");
            for (int round = 0; round < rounds; round++)
            {
                for (int i = 0; i < variants.Length; i++)
                {
                    await MeasureAsync(variants[(i + round) % variants.Length], batch, record: true);
                }
            }
        }
        finally
        {
            if (plain is not null)
            {
                await plain.DisposeAsync();
            }

            if (intercepted is not null)
            {
                await intercepted.DisposeAsync();
            }

            server.StandardInput.Close();
            if (!server.WaitForExit(10_000))
            {
                server.Kill();
            }
        }

        double plainP50 = TransportBenchmark.Percentile(variants[0].Latencies, 0.5);
        double plainSpun = TransportBenchmark.Percentile(Spun(variants[0].Latencies), 0.5);
        Console.WriteLine();
        Console.WriteLine($"{"variant",-36} {"p50 ns",7} {"p99 ns",7} {"ratio",6} {"woken",6} {"spun p50",9} {"ratio",6} {"client B",9} {"server B",9}");
        Console.WriteLine(new string('-', 103));
        foreach (Variant variant in variants)
        {
            double p50 = TransportBenchmark.Percentile(variant.Latencies, 0.5);
            double spun = TransportBenchmark.Percentile(Spun(variant.Latencies), 0.5);
            string spunColumns = spun > 0 && plainSpun > 0 ? $"{ToNs(spun),9:0} {spun / plainSpun,5:0.00}x" : $"{"-",9} {"-",6}"; // no call was caught spinning
            Console.WriteLine($"{variant.Name,-36} {ToNs(p50),7:0} {ToNs(TransportBenchmark.Percentile(variant.Latencies, 0.99)),7:0} {p50 / plainP50,5:0.00}x {Woken(variant.Latencies),6:0%} {spunColumns} {(double)variant.ClientBytes / variant.Calls,9:0} {(double)variant.ServerBytes / variant.Calls,9:0}");
        }

        Console.WriteLine("ratio: to the plain call; woken: calls over 10 us (a side slept); spun p50: the p50 of the others; client B, server B: bytes allocated per call in each process");

        return 0;
    }

    /// <summary><paramref name="calls"/> calls one at a time; for a telemetry variant both processes' listeners listen only meanwhile.</summary>
    private static async Task MeasureAsync(Variant variant, int calls, bool record)
    {
        IObservedBench service = variant.Service;
        bool telemetry = variant.Features.HasFlag(Features.Telemetry);
        bool metadata = variant.Features.HasFlag(Features.Metadata);
        if (telemetry)
        {
            await service.SetListeningAsync(true);
        }

        long[] latencies = new long[calls];
        long serverBefore = await service.AllocatedBytesAsync();
        long clientBytes;
        using (Listeners? listening = telemetry ? new Listeners() : null)
        {
            long clientBefore = GC.GetTotalAllocatedBytes(precise: false);
            for (int i = 0; i < calls; i++)
            {
                long start = Stopwatch.GetTimestamp();
                if (metadata)
                {
                    using (OffloadCallScope.Begin().WithHeader(Header, "acme").WithDeadline(TimeSpan.FromSeconds(30)))
                    {
                        await service.AddAsync(i, 1);
                    }
                }
                else
                {
                    await service.AddAsync(i, 1);
                }

                latencies[i] = Stopwatch.GetTimestamp() - start;
            }

            clientBytes = GC.GetTotalAllocatedBytes(precise: false) - clientBefore;
        }

        long serverBytes = await service.AllocatedBytesAsync() - serverBefore;
        if (telemetry)
        {
            await service.SetListeningAsync(false);
        }

        if (record)
        {
            variant.Latencies.AddRange(latencies);
            variant.ClientBytes += clientBytes;
            variant.ServerBytes += serverBytes;
            variant.Calls += calls;
        }
    }

    /// <summary>The server process: the plain server on <paramref name="endpoint"/>, the one with a server interceptor beside it.</summary>
    public static async Task<int> ServeAsync(string endpoint)
    {
        var bench = new ObservedBench();
        var options = new OffloadRpcOptions();
        options.ServerInterceptors.Add(new PassThroughServerInterceptor());
        await using var plain = new OffloadRpcServer(endpoint);
        await using var intercepted = new OffloadRpcServer(endpoint + "-intercepted", options);
        plain.Register<IObservedBench>(bench);
        intercepted.Register<IObservedBench>(bench);
        await plain.StartAsync();
        await intercepted.StartAsync();
        Console.WriteLine("READY");
        await Task.Run(() => Console.In.ReadToEnd());
        bench.Listening?.Dispose();
        return 0;
    }

    /// <summary>
    /// The share of calls slower than 10 us: those where a side slept and was woken (~20-40 us on a VM) rather
    /// than caught the message spinning (~2 us). A shared machine moves calls between the two; the ratios
    /// compare like with like only while the shares are close.
    /// </summary>
    private static double Woken(List<long> latencies)
    {
        long threshold = Stopwatch.Frequency / 100_000;
        return (double)latencies.Count(l => l > threshold) / latencies.Count;
    }

    private static List<long> Spun(List<long> latencies)
    {
        long threshold = Stopwatch.Frequency / 100_000;
        List<long> spun = latencies.FindAll(l => l <= threshold);
        return spun.Count == 0 ? [0] : spun;
    }

    private static double ToNs(double ticks) => ticks * 1e9 / Stopwatch.Frequency;

    private sealed class ObservedBench : IObservedBench
    {
        public Listeners? Listening { get; private set; }

        public ValueTask<int> AddAsync(int a, int b, CancellationToken ct = default) => ValueTask.FromResult(a + b);

        public ValueTask<long> AllocatedBytesAsync(CancellationToken ct = default) => ValueTask.FromResult(GC.GetTotalAllocatedBytes(precise: false));

        public ValueTask SetListeningAsync(bool listening, CancellationToken ct = default)
        {
            Listening?.Dispose();
            Listening = listening ? new Listeners() : null;
            return ValueTask.CompletedTask;
        }
    }

    private sealed class PassThroughClientInterceptor : ClientInterceptor
    {
        public override ValueTask<TResult> InterceptAsync<TResult>(ClientInterceptorContext context, ClientCallContinuation<TResult> continuation) => continuation(context);
    }

    /// <summary>Reads a header, as a tenant check would, and continues.</summary>
    private sealed class PassThroughServerInterceptor : ServerInterceptor
    {
        public override ValueTask<TResult> InterceptAsync<TResult>(ServerInterceptorContext context, ServerCallContinuation<TResult> continuation)
        {
            _ = context.RequestHeaders.ContainsKey(Header);
            return continuation(context);
        }
    }

    /// <summary>An ActivityListener that samples every OffloadRpc span and a MeterListener on every OffloadRpc instrument, as an exporter would.</summary>
    private sealed class Listeners : IDisposable
    {
        private readonly ActivityListener _activities;
        private readonly MeterListener _meters = new();
        private long _spans;
        private double _sum;

        public Listeners()
        {
            _activities = new ActivityListener
            {
                ShouldListenTo = source => source.Name == OffloadRpcTelemetry.ActivitySourceName,
                Sample = static (ref ActivityCreationOptions<ActivityContext> _) => ActivitySamplingResult.AllDataAndRecorded,
                ActivityStopped = _ => Interlocked.Increment(ref _spans),
            };
            ActivitySource.AddActivityListener(_activities);
            _meters.InstrumentPublished = (instrument, listener) =>
            {
                if (instrument.Meter.Name == OffloadRpcTelemetry.MeterName)
                {
                    listener.EnableMeasurementEvents(instrument);
                }
            };
            _meters.SetMeasurementEventCallback<double>((_, value, _, _) => _sum += value);
            _meters.SetMeasurementEventCallback<long>((_, value, _, _) => _sum += value);
            _meters.Start();
        }

        public void Dispose()
        {
            _activities.Dispose();
            _meters.Dispose();
        }
    }
}
