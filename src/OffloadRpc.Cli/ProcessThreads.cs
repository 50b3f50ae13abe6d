using System.Globalization;

namespace OffloadRpc.Cli;

/// <summary>
/// The threads of a process as Linux lists them: the count from <c>/proc/PID/status</c>, and the
/// names from <c>/proc/PID/task/*/comm</c> (15 characters at most, as the kernel keeps them), so a
/// benchmark can say how many threads a server has and whose they are. The peer benchmark links this file.
/// </summary>
internal static class ProcessThreads
{
    /// <summary>The <c>Threads:</c> line of the process's status; -1 if the process is gone.</summary>
    public static int Count(int processId)
    {
        try
        {
            foreach (string line in File.ReadLines($"/proc/{processId}/status"))
            {
                if (line.StartsWith("Threads:", StringComparison.Ordinal))
                {
                    return int.Parse(line.AsSpan(8).Trim(), NumberStyles.None, CultureInfo.InvariantCulture);
                }
            }
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException)
        {
            // exited
        }

        return -1;
    }

    /// <summary>Thread names (sorted) and how many threads carry each.</summary>
    public static SortedDictionary<string, int> Names(int processId)
    {
        var names = new SortedDictionary<string, int>(StringComparer.Ordinal);
        try
        {
            foreach (string task in Directory.EnumerateDirectories($"/proc/{processId}/task"))
            {
                try
                {
                    string name = File.ReadAllText(Path.Combine(task, "comm")).TrimEnd('\n');
                    names[name] = names.GetValueOrDefault(name) + 1;
                }
                catch (Exception ex) when (ex is IOException or UnauthorizedAccessException)
                {
                    // the thread ended while we listed them
                }
            }
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException)
        {
            // exited
        }

        return names;
    }
}
