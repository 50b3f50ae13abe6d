using System.Diagnostics;
using System.Diagnostics.Metrics;

namespace OffloadRpc.Tests.Infrastructure;

/// <summary>
/// Records, in this process, every span of the "OffloadRpc" activity source (and of the test's own sources)
/// and every measurement of the "OffloadRpc" meter, for the telemetry tests to read.
/// </summary>
internal sealed class TelemetryRecorder : IDisposable
{
    private readonly ActivityListener _listener;
    private readonly MeterListener _meters;
    private readonly List<Activity> _spans = [];
    private readonly List<(string Instrument, double Value, KeyValuePair<string, object?>[] Tags)> _measurements = [];

    /// <param name="sources">The test's own activity sources (its root spans), besides OffloadRpc's.</param>
    public TelemetryRecorder(params string[] sources)
    {
        _listener = new ActivityListener
        {
            ShouldListenTo = s => s.Name == OffloadRpcTelemetry.ActivitySourceName || sources.Contains(s.Name),
            Sample = (ref ActivityCreationOptions<ActivityContext> _) => ActivitySamplingResult.AllDataAndRecorded,
            ActivityStopped = a =>
            {
                lock (_spans)
                {
                    _spans.Add(a);
                }
            },
        };
        ActivitySource.AddActivityListener(_listener);
        _meters = new MeterListener
        {
            InstrumentPublished = (instrument, l) =>
            {
                if (instrument.Meter.Name == OffloadRpcTelemetry.MeterName)
                {
                    l.EnableMeasurementEvents(instrument);
                }
            },
        };
        _meters.SetMeasurementEventCallback<double>((i, value, tags, _) => Measure(i, value, tags));
        _meters.SetMeasurementEventCallback<long>((i, value, tags, _) => Measure(i, value, tags));
        _meters.Start();
    }

    /// <summary>The spans stopped so far.</summary>
    public Activity[] Spans
    {
        get
        {
            lock (_spans)
            {
                return [.. _spans];
            }
        }
    }

    /// <summary>
    /// Each measurement so far as "instrument value-of-tag1 value-of-tag2 ..." (an absent tag is empty; trailing
    /// spaces trimmed), e.g. <c>Measurements("rpc.method", "rpc.offloadrpc.status_code")</c> gives "rpc.client.duration TraceAsync ok".
    /// Observable instruments are read first.
    /// </summary>
    public string[] Measurements(params string[] tagKeys)
    {
        _meters.RecordObservableInstruments();
        lock (_measurements)
        {
            return [.. _measurements.Select(m => string.Join(' ', [m.Instrument, .. tagKeys.Select(k => m.Tags.FirstOrDefault(t => t.Key == k).Value?.ToString() ?? "")]).TrimEnd())];
        }
    }

    /// <summary>Reads the observable instruments now and returns what <paramref name="instrument"/> reported for the tag <paramref name="tagKey"/> = <paramref name="tagValue"/>.</summary>
    public double Observe(string instrument, string tagKey, string tagValue)
    {
        lock (_measurements)
        {
            _measurements.RemoveAll(m => m.Instrument == instrument);
        }

        _meters.RecordObservableInstruments();
        lock (_measurements)
        {
            (string Instrument, double Value, KeyValuePair<string, object?>[] Tags) found = _measurements.FindLast(m => m.Instrument == instrument && m.Tags.Any(t => t.Key == tagKey && Equals(t.Value, tagValue)));
            return found.Instrument is not null
                ? found.Value
                : throw new InvalidOperationException($"{instrument} reported nothing for {tagKey} = {tagValue}: the instruments are made with the first call in this process.");
        }
    }

    /// <summary>The sum of what <paramref name="instrument"/> recorded so far with the tag <paramref name="tagKey"/> = <paramref name="tagValue"/> (an up-down counter's current value).</summary>
    public double Sum(string instrument, string tagKey, string tagValue)
    {
        lock (_measurements)
        {
            return _measurements.Where(m => m.Instrument == instrument && m.Tags.Any(t => t.Key == tagKey && Equals(t.Value, tagValue))).Sum(m => m.Value);
        }
    }

    public void Dispose()
    {
        _meters.Dispose();
        _listener.Dispose();
    }

    private void Measure(Instrument instrument, double value, ReadOnlySpan<KeyValuePair<string, object?>> tags)
    {
        KeyValuePair<string, object?>[] copy = tags.ToArray();
        lock (_measurements)
        {
            _measurements.Add((instrument.Name, value, copy));
        }
    }
}
