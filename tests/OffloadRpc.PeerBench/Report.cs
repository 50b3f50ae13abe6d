using System.Globalization;
using System.Text.Json;
using System.Text.Json.Serialization;
using Spectre.Console;

namespace OffloadRpc.PeerBench;

/// <summary>One row of the results: one system, one operation, one payload size.</summary>
internal sealed record ResultRow(
    [property: JsonPropertyName("system")] string System,
    [property: JsonPropertyName("op")] string Op,
    [property: JsonPropertyName("bytes")] long Bytes,
    [property: JsonPropertyName("p50_us")] double P50Microseconds,
    [property: JsonPropertyName("p99_us")] double P99Microseconds,
    [property: JsonPropertyName("gbps")] double Gbps,
    [property: JsonPropertyName("calls_per_s")] double CallsPerSecond,
    [property: JsonPropertyName("client_cpu_us")] double ClientCpuMicroseconds,
    [property: JsonPropertyName("server_cpu_us")] double ServerCpuMicroseconds,
    [property: JsonPropertyName("mode")] string? Mode = null,
    [property: JsonPropertyName("calls")] int Calls = 0,
    [property: JsonPropertyName("excluded_write_us")] double? ExcludedWriteMicroseconds = null);

[JsonSerializable(typeof(List<ResultRow>))]
[JsonSourceGenerationOptions(WriteIndented = true, DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull)]
internal sealed partial class ResultJson : JsonSerializerContext
{
}

internal static class Report
{
    public static readonly string[] Peers = ["grpc-uds", "streamjsonrpc-uds"];

    public static void Table(IReadOnlyList<ResultRow> rows, string title)
    {
        var table = new Table().Border(TableBorder.Rounded).Title($"[bold]{Markup.Escape(title)}[/]");
        foreach (string column in new[] { "op", "size", "system", "p50 us", "p99 us", "GB/s", "calls/s", "client CPU us/call", "server CPU us/call", "mode" })
        {
            table.AddColumn(new TableColumn(column).RightAligned());
        }

        string? lastGroup = null;
        foreach (ResultRow row in rows)
        {
            string group = $"{row.Op} {row.Bytes}";
            if (lastGroup is not null && group != lastGroup)
            {
                table.AddEmptyRow();
            }

            lastGroup = group;
            bool ours = row.System.StartsWith("offloadrpc", StringComparison.Ordinal);
            string system = ours ? $"[green]{row.System}[/]" : row.System.StartsWith("floor", StringComparison.Ordinal) ? $"[grey]{row.System}[/]" : row.System;
            table.AddRow(row.Op, Size(row.Bytes), system, F(row.P50Microseconds), F(row.P99Microseconds), row.Gbps > 0 ? F(row.Gbps) : "-", F0(row.CallsPerSecond), F(row.ClientCpuMicroseconds), F(row.ServerCpuMicroseconds), Markup.Escape(row.Mode ?? string.Empty));
        }

        AnsiConsole.Write(table);
    }

    public static async Task WriteJsonAsync(IReadOnlyList<ResultRow> rows, string path)
    {
        await File.WriteAllTextAsync(path, JsonSerializer.Serialize(rows.ToList(), ResultJson.Default.ListResultRow));
    }

    /// <summary>
    /// The targets of the peer benchmark, checked against this run's rows: printed as met or missed
    /// with the measured ratio (a miss is reported, never hidden).
    /// </summary>
    public static void Targets(IReadOnlyList<ResultRow> rows)
    {
        var lines = new List<string>();
        ResultRow? Find(string system, string op, long bytes) => rows.FirstOrDefault(r => r.System == system && r.Op == op && r.Bytes == bytes);

        foreach (string peer in Peers)
        {
            if (Find("offloadrpc-auto", "checksum", 64) is { } ours && Find(peer, "checksum", 64) is { } peerSmall)
            {
                lines.Add(Verdict($"64 B checksum p50: {peer} {F(peerSmall.P50Microseconds)} us / offloadrpc-auto {F(ours.P50Microseconds)} us", peerSmall.P50Microseconds / ours.P50Microseconds, 50));
            }

            foreach (long bytes in rows.Where(r => r.Op == "checksum" && r.Bytes >= 16 << 20).Select(r => r.Bytes).Distinct().Order())
            {
                if (Find("offloadrpc-auto", "checksum", bytes) is { } auto && Find(peer, "checksum", bytes) is { } peerRow)
                {
                    lines.Add(Verdict($"{Size(bytes)} checksum GB/s: offloadrpc-auto {F(auto.Gbps)} / {peer} {F(peerRow.Gbps)}", auto.Gbps / peerRow.Gbps, 30));
                }
            }

            foreach (string op in new[] { "checksum", "touch" })
            {
                ResultRow? peer64 = Find(peer, op, 64 << 20);
                if (peer64 is null)
                {
                    continue;
                }

                foreach (string system in new[] { "offloadrpc-auto", "offloadrpc-best", "offloadrpc-zero-copy" })
                {
                    if (Find(system, op, 64 << 20) is { } ours64)
                    {
                        double theirs = peer64.ClientCpuMicroseconds + peer64.ServerCpuMicroseconds;
                        double mine = ours64.ClientCpuMicroseconds + ours64.ServerCpuMicroseconds;
                        lines.Add(Verdict($"64 MiB {op} CPU/call, both processes: {peer} {F(theirs)} us / {system} {F(mine)} us", theirs / mine, 10));
                    }
                }
            }
        }

        if (Find("offloadrpc-zero-copy", "touch", 64) is { } small && Find("offloadrpc-zero-copy", "touch", 64 << 20) is { } large)
        {
            double ratio = large.P50Microseconds / small.P50Microseconds;
            lines.Add((ratio <= 3 ? "[green]met   [/]" : "[red]missed[/]") + Markup.Escape($" zero-copy touch p50 64 MiB / 64 B: {F(large.P50Microseconds)} / {F(small.P50Microseconds)} us = {ratio:0.00}x (target <= 3x)"));
        }

        if (lines.Count > 0)
        {
            AnsiConsole.MarkupLine("[bold]Targets[/] (this run):");
            foreach (string line in lines)
            {
                AnsiConsole.MarkupLine("  " + line);
            }
        }
    }

    private static string Verdict(string what, double ratio, double target) =>
        (ratio >= target ? "[green]met   [/]" : "[red]missed[/]") + Markup.Escape($" {what} = {ratio:0.0}x (target >= {target}x)");

    public static void Plot(IReadOnlyList<ResultRow> rows, string path)
    {
        var multiplot = new ScottPlot.Multiplot();
        ScottPlot.IMultiplotExtensions.AddPlots(multiplot, 4);
        multiplot.Layout = new ScottPlot.MultiplotLayouts.Grid(2, 2);
        string[] ops = ["checksum", "touch"];
        for (int column = 0; column < 2; column++)
        {
            string op = ops[column];
            ScottPlot.Plot throughput = ScottPlot.IMultiplotExtensions.GetPlot(multiplot, column);
            ScottPlot.Plot latency = ScottPlot.IMultiplotExtensions.GetPlot(multiplot, 2 + column);
            ResultRow[] plotted = rows.Where(r => (r.Op == op || (r.System == "floor-memcpy" && r.Op == "copy")) && r.Gbps > 0).ToArray();
            foreach (IGrouping<string, ResultRow> series in plotted.GroupBy(r => r.System))
            {
                ResultRow[] points = series.OrderBy(r => r.Bytes).ToArray();
                double[] x = points.Select(p => Math.Log10(p.Bytes)).ToArray();
                AddLine(throughput, series.Key, x, points.Select(p => Math.Log10(p.Gbps)).ToArray());
                AddLine(latency, series.Key, x, points.Select(p => Math.Log10(p.P50Microseconds)).ToArray());
            }

            if (rows.FirstOrDefault(r => r.System == "floor-pingpong") is { } pingPong)
            {
                ScottPlot.Plottables.HorizontalLine floor = latency.Add.HorizontalLine(Math.Log10(pingPong.P50Microseconds));
                floor.LegendText = "floor-pingpong";
                floor.LinePattern = ScottPlot.LinePattern.Dotted;
                floor.Color = ScottPlot.Colors.Gray;
            }

            long[] sizes = plotted.Select(r => r.Bytes).Distinct().Order().ToArray();
            double[] latencies = plotted.Select(r => r.P50Microseconds).Concat(rows.Where(r => r.System == "floor-pingpong").Select(r => r.P50Microseconds)).Select(Math.Log10).ToArray();
            LogAxes(throughput, $"{op}: throughput (payload / p50 call time)", "GB/s (log)", sizes, plotted.Select(r => Math.Log10(r.Gbps)).ToArray());
            LogAxes(latency, $"{op}: p50 latency", "p50 us (log)", sizes, latencies);
        }

        ScottPlot.IMultiplotExtensions.SavePng(multiplot, path, 1600, 1100);
    }

    private static void AddLine(ScottPlot.Plot plot, string system, double[] x, double[] y)
    {
        ScottPlot.Plottables.Scatter line = plot.Add.Scatter(x, y);
        line.LegendText = system;
        line.LineWidth = system.StartsWith("offloadrpc", StringComparison.Ordinal) ? 2.5f : 1.5f;
        line.MarkerSize = 6;
        if (system.StartsWith("floor", StringComparison.Ordinal))
        {
            line.LinePattern = ScottPlot.LinePattern.Dashed;
            line.Color = ScottPlot.Colors.Gray;
        }
    }

    /// <summary>Log axes: the data are log10 values; ticks at the run's sizes (x) and at decades (y), labelled in plain units.</summary>
    private static void LogAxes(ScottPlot.Plot plot, string title, string yLabel, IEnumerable<long> sizes, double[] yLogValues)
    {
        var x = new ScottPlot.TickGenerators.NumericManual();
        foreach (long size in sizes)
        {
            x.AddMajor(Math.Log10(size), Size(size));
        }

        var y = new ScottPlot.TickGenerators.NumericManual();
        if (yLogValues.Length > 0)
        {
            for (int decade = (int)Math.Floor(yLogValues.Min()); decade <= (int)Math.Ceiling(yLogValues.Max()); decade++)
            {
                y.AddMajor(decade, decade < 0 ? "0." + new string('0', -decade - 1) + "1" : Math.Pow(10, decade).ToString("#,0", CultureInfo.InvariantCulture));
            }
        }

        plot.Axes.Bottom.TickGenerator = x;
        plot.Axes.Left.TickGenerator = y;
        plot.Title(title);
        plot.XLabel("payload size (log)");
        plot.YLabel(yLabel);
        plot.ShowLegend(ScottPlot.Alignment.UpperLeft);
    }

    public static string Size(long bytes) => bytes switch
    {
        >= 1 << 30 when bytes % (1 << 30) == 0 => $"{bytes >> 30} GiB",
        >= 1 << 20 when bytes % (1 << 20) == 0 => $"{bytes >> 20} MiB",
        >= 1 << 10 when bytes % (1 << 10) == 0 => $"{bytes >> 10} KiB",
        _ => $"{bytes} B",
    };

    public static string F(double value) => value switch
    {
        < 10 => value.ToString("0.00", CultureInfo.InvariantCulture),
        < 1000 => value.ToString("0.0", CultureInfo.InvariantCulture),
        _ => value.ToString("#,0", CultureInfo.InvariantCulture),
    };

    private static string F0(double value) => value.ToString("#,0", CultureInfo.InvariantCulture);
}
