using System.Diagnostics.Metrics;
using System.Globalization;

namespace OffloadRpc.Engines;

/// <summary>How one payload will actually move: the mode and cache policy after Auto is resolved.</summary>
internal readonly record struct TransferPlan(TransferMode Mode, CachePolicy Cache)
{
    public bool BypassCache => Cache == CachePolicy.Bypass;
}

/// <summary>
/// Resolves <see cref="TransferMode.Auto"/> and <see cref="CachePolicy.Auto"/> per payload: the calling
/// thread copies small payloads (an offload costs a hand-off that only pays for itself on large
/// ones); a large single copy is split between the caller and the copy workers (Hybrid);
/// destination writes bypass the cache once a payload outgrows the last-level cache.
/// </summary>
internal static class TransferPolicy
{
    /// <summary>The chunk a pipelined payload is written and published in.</summary>
    public const long PipelineChunkBytes = TransferThresholds.PipelineChunkBytes;

    /// <summary>Below this a hand-off to another thread costs more than the copy it saves.</summary>
    public const long OffloadCrossoverBytes = TransferThresholds.OffloadCrossoverBytes;

    private static readonly Lazy<long> s_lastLevelCache = new(ReadLastLevelCacheBytes);

    /// <summary>The last-level cache size from sysfs (32 MiB when not reported).</summary>
    public static long LastLevelCacheBytes => s_lastLevelCache.Value;

    public static TransferPlan Resolve(long length, TransferMode mode, CachePolicy cache, long pipelineChunkBytes = PipelineChunkBytes)
    {
        if (mode == TransferMode.Pipelined && length < 2 * pipelineChunkBytes)
        {
            mode = TransferMode.Copy; // a single chunk: nothing to overlap (whatever a calibration says)
        }

        if ((mode == TransferMode.Auto || cache == CachePolicy.Auto) && length >= CopyRoutines.NonTemporalThreshold && Calibration.Current is { } calibration)
        {
            TransferPlan measured = calibration.Best(length, mode, cache); // measured on this machine: the fastest that fits the request
            return measured.Mode == TransferMode.Pipelined && length < 2 * pipelineChunkBytes ? new TransferPlan(TransferMode.Copy, measured.Cache) : measured;
        }

        if (mode == TransferMode.Auto)
        {
            mode = length < OffloadCrossoverBytes ? TransferMode.Copy : TransferMode.Hybrid;
        }

        if (mode is TransferMode.Offload or TransferMode.Hybrid && length < CopyRoutines.NonTemporalThreshold)
        {
            mode = TransferMode.Copy; // nothing to share out
        }

        if (cache == CachePolicy.Auto)
        {
            cache = length > LastLevelCacheBytes ? CachePolicy.Bypass : CachePolicy.Inject;
        }

        return new TransferPlan(mode, cache);
    }

    private static long ReadLastLevelCacheBytes()
    {
        try
        {
            const string root = "/sys/devices/system/cpu/cpu0/cache";
            long best = 0;
            int bestLevel = 0;
            foreach (string index in Directory.GetDirectories(root, "index*"))
            {
                int level = int.Parse(File.ReadAllText(Path.Combine(index, "level")).Trim(), CultureInfo.InvariantCulture);
                string type = File.ReadAllText(Path.Combine(index, "type")).Trim();
                string size = File.ReadAllText(Path.Combine(index, "size")).Trim();
                if (type == "Instruction" || level < bestLevel)
                {
                    continue;
                }

                long bytes = size.EndsWith('K') ? long.Parse(size[..^1], CultureInfo.InvariantCulture) << 10
                    : size.EndsWith('M') ? long.Parse(size[..^1], CultureInfo.InvariantCulture) << 20
                    : long.Parse(size, CultureInfo.InvariantCulture);
                bestLevel = level;
                best = bytes;
            }

            return best > 0 ? best : TransferThresholds.DefaultLastLevelCacheBytes;
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException or FormatException)
        {
            return TransferThresholds.DefaultLastLevelCacheBytes;
        }
    }
}

/// <summary>The transfer decisions and bytes moved per mode, as System.Diagnostics.Metrics (meter "OffloadRpc").</summary>
internal static class TransferMetrics
{
    public static readonly Meter Meter = Telemetry.Meter;

    private static readonly Counter<long> s_transfers = Meter.CreateCounter<long>("offloadrpc.transfers", unit: "{payload}", description: "Payloads moved into shared memory, by the transfer mode and cache policy chosen.");

    private static readonly Counter<long> s_bytes = Meter.CreateCounter<long>("offloadrpc.transfer.bytes", unit: "By", description: "Bytes moved into shared memory, by the transfer mode and cache policy chosen.");

    public static void Record(in TransferPlan plan, long bytes)
    {
        if (!s_bytes.Enabled && !s_transfers.Enabled)
        {
            return;
        }

        var mode = new KeyValuePair<string, object?>("mode", ModeName(plan.Mode));
        var cache = new KeyValuePair<string, object?>("cache", plan.Cache == CachePolicy.Bypass ? "bypass" : "inject");
        s_transfers.Add(1, mode, cache);
        s_bytes.Add(bytes, mode, cache);
    }

    private static string ModeName(TransferMode mode) => mode switch
    {
        TransferMode.Copy => "copy",
        TransferMode.Offload => "offload",
        TransferMode.Hybrid => "hybrid",
        TransferMode.Pipelined => "pipelined",
        _ => "auto",
    };
}
