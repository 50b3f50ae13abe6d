using System.Globalization;
using OffloadRpc.Engines;
using Spectre.Console;

namespace OffloadRpc.Cli;

/// <summary>`offloadrpc calibrate`: measures every engine and mode per size on this machine and stores it for the Auto policy.</summary>
internal static class Calibrate
{
    public static int Run(bool quick)
    {
        AnsiConsole.MarkupLine($"Calibrating copy engines ({WorkerCopyEngine.Shared.ThreadCount} copy worker(s), last-level cache {TransferPolicy.LastLevelCacheBytes >> 20} MiB){(quick ? " [grey](quick)[/]" : string.Empty)} ...");
        CalibrationResult result = Calibration.Measure(quick, size => AnsiConsole.MarkupLine($"  measured {Size(size)}"));
        Calibration.Save(result);

        var table = new Table().Border(TableBorder.Rounded).Title("[bold]GB/s per mode and cache policy[/]");
        table.AddColumn("size");
        foreach (string column in new[] { "copy+inject", "copy+bypass", "offload+inject", "hybrid+inject", "hybrid+bypass", "Auto picks" })
        {
            table.AddColumn(new TableColumn(column).RightAligned());
        }

        foreach (CalibrationPoint point in result.Points)
        {
            TransferPlan best = result.Best(point.Bytes, TransferMode.Auto, CachePolicy.Auto);
            table.AddRow(
                Size(point.Bytes),
                F(point.CopyInjectGbps),
                F(point.CopyBypassGbps),
                F(point.OffloadInjectGbps),
                F(point.HybridInjectGbps),
                F(point.HybridBypassGbps),
                $"{best.Mode.ToString().ToLowerInvariant()}+{best.Cache.ToString().ToLowerInvariant()}");
        }

        AnsiConsole.Write(table);
        AnsiConsole.MarkupLine($"offload fixed cost ~{result.OffloadFixedCostMicroseconds.ToString("0.0", CultureInfo.InvariantCulture)} us; stored in {Markup.Escape(Calibration.StorePath)}");
        return 0;
    }

    private static string F(double gbps) => gbps.ToString("0.0", CultureInfo.InvariantCulture);

    internal static string Size(long bytes) => bytes switch
    {
        >= 1 << 20 => $"{bytes >> 20} MiB",
        >= 1 << 10 => $"{bytes >> 10} KiB",
        _ => $"{bytes} B",
    };
}
