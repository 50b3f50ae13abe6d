using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Serialization;
using OffloadRpc.Transport;

namespace OffloadRpc.Engines;

/// <summary>Measured GB/s of every mode and cache policy at one size, on this machine.</summary>
internal sealed record CalibrationPoint(long Bytes, double CopyInjectGbps, double CopyBypassGbps, double OffloadInjectGbps, double HybridInjectGbps, double HybridBypassGbps)
{
    public IEnumerable<(TransferPlan Plan, double Gbps)> Plans()
    {
        yield return (new TransferPlan(TransferMode.Copy, CachePolicy.Inject), CopyInjectGbps);
        yield return (new TransferPlan(TransferMode.Copy, CachePolicy.Bypass), CopyBypassGbps);
        yield return (new TransferPlan(TransferMode.Offload, CachePolicy.Inject), OffloadInjectGbps);
        yield return (new TransferPlan(TransferMode.Hybrid, CachePolicy.Inject), HybridInjectGbps);
        yield return (new TransferPlan(TransferMode.Hybrid, CachePolicy.Bypass), HybridBypassGbps);
    }
}

/// <summary>A calibration of this machine: bandwidth per engine, mode and size, the LLC, and the offload's fixed cost.</summary>
internal sealed record CalibrationResult(string Machine, DateTimeOffset MeasuredAt, long LastLevelCacheBytes, int Workers, double OffloadFixedCostMicroseconds, CalibrationPoint[] Points)
{
    /// <summary>
    /// The part of a Hybrid copy of <paramref name="bytes"/> the caller should take so that it and
    /// <paramref name="workers"/> copy threads finish together: in proportion to the bandwidth each
    /// showed alone (inline copy versus a worker's offloaded copy) at the nearest calibrated size.
    /// </summary>
    public double CallerShare(long bytes, int workers)
    {
        CalibrationPoint nearest = Points.MinBy(p => Math.Abs(Math.Log(Math.Max(p.Bytes, 1)) - Math.Log(Math.Max(bytes, 1))))!;
        double caller = Math.Max(nearest.CopyInjectGbps, 0.1);
        double worker = Math.Max(nearest.OffloadInjectGbps, 0.1);
        return Math.Clamp(caller / (caller + worker * workers), 0.1, 0.9);
    }

    /// <summary>The fastest plan at the calibrated size nearest to <paramref name="bytes"/> (log scale), within the given constraints.</summary>
    public TransferPlan Best(long bytes, TransferMode mode, CachePolicy cache)
    {
        CalibrationPoint nearest = Points.MinBy(p => Math.Abs(Math.Log(Math.Max(p.Bytes, 1)) - Math.Log(Math.Max(bytes, 1))))!;
        (TransferPlan Plan, double Gbps) best = default;
        foreach ((TransferPlan plan, double gbps) in nearest.Plans())
        {
            bool fits = (mode == TransferMode.Auto || plan.Mode == mode) && (cache == CachePolicy.Auto || plan.Cache == cache);
            if (fits && gbps > best.Gbps)
            {
                best = (plan, gbps);
            }
        }

        return best.Gbps > 0 ? best.Plan : new TransferPlan(mode == TransferMode.Auto ? TransferMode.Copy : mode, cache == CachePolicy.Auto ? CachePolicy.Inject : cache);
    }
}

[JsonSerializable(typeof(CalibrationResult))]
[JsonSourceGenerationOptions(WriteIndented = true, PropertyNamingPolicy = JsonKnownNamingPolicy.SnakeCaseLower)]
internal sealed partial class CalibrationJson : JsonSerializerContext
{
}

/// <summary>
/// Measures each engine's bandwidth per size on the running machine (pre-touched, page-aligned
/// buffers; median of several copies), stores it per machine in the per-user runtime directory, and
/// hands it to the Auto policy.
/// </summary>
internal static class Calibration
{
    public static readonly long[] Sizes = [4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20];

    private static readonly object s_lock = new();
    private static CalibrationResult? s_loaded;
    private static bool s_triedLoad;

    /// <summary>A key of what the numbers depend on: CPU model, cores, kernel, runtime.</summary>
    public static string MachineKey
    {
        get
        {
            string cpu = File.ReadLines("/proc/cpuinfo").FirstOrDefault(l => l.StartsWith("model name", StringComparison.Ordinal)) ?? "unknown";
            string kernel = File.Exists("/proc/sys/kernel/osrelease") ? File.ReadAllText("/proc/sys/kernel/osrelease").Trim() : "unknown";
            string text = $"{cpu}|{Environment.ProcessorCount}|{kernel}|{Environment.Version}";
            ulong hash = 14695981039346656037;
            foreach (char c in text)
            {
                hash = (hash ^ c) * 1099511628211;
            }

            return hash.ToString("x16", System.Globalization.CultureInfo.InvariantCulture);
        }
    }

    public static string StorePath => Path.Combine(EndpointPath.UserDirectory(), $"calibration-{MachineKey}.json");

    /// <summary>The stored calibration of this machine, or null (then Auto uses built-in rules).</summary>
    public static CalibrationResult? Current
    {
        get
        {
            // Read per payload by the Auto policy: after the first load, no lock (the flag is written after the value).
            if (Volatile.Read(ref s_triedLoad))
            {
                return Volatile.Read(ref s_loaded);
            }

            lock (s_lock)
            {
                if (!s_triedLoad)
                {
                    s_loaded = TryLoad();
                    Volatile.Write(ref s_triedLoad, true);
                }

                return s_loaded;
            }
        }
    }

    private static CalibrationResult? TryLoad()
    {
        try
        {
            string path = StorePath;
            if (!File.Exists(path))
            {
                return null;
            }

            CalibrationResult? result = JsonSerializer.Deserialize(File.ReadAllText(path), CalibrationJson.Default.CalibrationResult);
            return result is { Points.Length: > 0 } && result.Machine == MachineKey ? result : null;
        }
        catch (Exception ex) when (ex is IOException or JsonException or UnauthorizedAccessException or OffloadRpcException)
        {
            return null; // a damaged or foreign file is ignored, never trusted
        }
    }

    public static void Save(CalibrationResult result)
    {
        string path = StorePath;
        string temporary = path + ".tmp";
        File.WriteAllText(temporary, JsonSerializer.Serialize(result, CalibrationJson.Default.CalibrationResult));
        File.Move(temporary, path, overwrite: true);
        lock (s_lock)
        {
            Volatile.Write(ref s_loaded, result);
            Volatile.Write(ref s_triedLoad, true);
        }
    }

    /// <summary>Forgets the loaded calibration (tests).</summary>
    internal static void Use(CalibrationResult? result)
    {
        lock (s_lock)
        {
            Volatile.Write(ref s_loaded, result);
            Volatile.Write(ref s_triedLoad, true);
        }
    }

    /// <summary>
    /// Measures, over a real loopback connection in this process, how long a call carrying each size
    /// takes in each plan. Measuring through the transport (and not a bare copy loop) keeps the
    /// conditions real: on a small machine the copy workers compete for cores with both receive
    /// threads, and a bare loop would keep the workers hot and hide their wake-up cost.
    /// </summary>
    public static CalibrationResult Measure(bool quick, Action<long>? progress = null)
    {
        string endpoint = $"calibrate-{Environment.ProcessId}-{Environment.TickCount64}";
        var listener = new RpcListener(endpoint, new TransportOptions(), [], _ => new DiscardHandler());
        listener.Start();
        try
        {
            RpcConnection connection = Handshake.ConnectAsync(endpoint, new TransportOptions(), [], null, CancellationToken.None).GetAwaiter().GetResult();
            try
            {
                byte[] source = GC.AllocateUninitializedArray<byte>((int)Sizes[^1], pinned: true);
                source.AsSpan().Fill(0xA5);
                // Warm up first (tiered JIT, the arena's first segment, the workers): every plan, for a while.
                var warm = Stopwatch.StartNew();
                while (warm.Elapsed < TimeSpan.FromMilliseconds(quick ? 300 : 1000))
                {
                    foreach ((TransferMode mode, CachePolicy cache) in new[] { (TransferMode.Copy, CachePolicy.Inject), (TransferMode.Copy, CachePolicy.Bypass), (TransferMode.Offload, CachePolicy.Inject), (TransferMode.Hybrid, CachePolicy.Inject) })
                    {
                        MedianCallSecondsAsync(connection, source.AsMemory(0, 64 << 10), mode, cache, 20).GetAwaiter().GetResult();
                    }
                }

                var points = new List<CalibrationPoint>();
                double fixedCost = 0;
                foreach (long size in Sizes)
                {
                    int iterations = (int)Math.Clamp((quick ? 512L << 20 : 2L << 30) / size, 5, quick ? 100 : 400);
                    ReadOnlyMemory<byte> payload = source.AsMemory(0, (int)size);
                    double Gbps(TransferMode mode, CachePolicy cache) =>
                        size / MedianCallSecondsAsync(connection, payload, mode, cache, iterations).GetAwaiter().GetResult() / 1e9;

                    double copy = Gbps(TransferMode.Copy, CachePolicy.Inject);
                    var point = new CalibrationPoint(size, copy, Gbps(TransferMode.Copy, CachePolicy.Bypass), Gbps(TransferMode.Offload, CachePolicy.Inject), Gbps(TransferMode.Hybrid, CachePolicy.Inject), Gbps(TransferMode.Hybrid, CachePolicy.Bypass));
                    if (size == Sizes[0])
                    {
                        // What an offload adds over copying inline, at a size where the copy itself is negligible.
                        fixedCost = Math.Max(0, (size / (point.OffloadInjectGbps * 1e9)) - (size / (copy * 1e9))) * 1e6;
                    }

                    points.Add(point);
                    progress?.Invoke(size);
                }

                return new CalibrationResult(MachineKey, DateTimeOffset.UtcNow, TransferPolicy.LastLevelCacheBytes, WorkerCopyEngine.Shared.ThreadCount, fixedCost, [.. points]);
            }
            finally
            {
                connection.DisposeAsync().AsTask().GetAwaiter().GetResult();
            }
        }
        finally
        {
            listener.DisposeAsync().AsTask().GetAwaiter().GetResult();
        }
    }

    /// <summary>The loopback server's side: takes the payload and answers (the receiver's cost is the same for every plan).</summary>
    private sealed class DiscardHandler : IRequestHandler
    {
        public ValueTask HandleAsync(IncomingCall call)
        {
            call.Reply(default);
            return ValueTask.CompletedTask;
        }
    }

    /// <summary>
    /// The median time of one call, timed in an await loop: after the first await the loop runs on the
    /// connection's poller thread, as a real caller's continuation does, with no blocking wake-up per call.
    /// </summary>
    private static async Task<double> MedianCallSecondsAsync(RpcConnection connection, ReadOnlyMemory<byte> payload, TransferMode mode, CachePolicy cache, int iterations)
    {
        var samples = new double[iterations];
        for (int i = -2; i < iterations; i++)
        {
            long start = Stopwatch.GetTimestamp();
            using (RpcReply reply = await connection.CallAsync(0, default, [OutboundPayload.Copy(payload, mode, cache)]).ConfigureAwait(false))
            {
            }

            if (i >= 0)
            {
                samples[i] = Math.Max(1, Stopwatch.GetTimestamp() - start) / (double)Stopwatch.Frequency;
            }
        }

        Array.Sort(samples);
        return samples[iterations / 2];
    }
}
