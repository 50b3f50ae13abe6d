using System;
using System.Text;

namespace OffloadRpc.Generators;

/// <summary>A small writer of indented C#: lines, and blocks that close themselves.</summary>
internal sealed class IndentedWriter
{
    private readonly StringBuilder _builder = new();
    private int _depth;

    public IndentedWriter Line(string text = "")
    {
        if (text.Length > 0)
        {
            _builder.Append(' ', _depth * 4);
            _builder.Append(text);
        }

        _builder.Append('\n');
        return this;
    }

    /// <summary>Writes <paramref name="header"/> and an opening brace; disposing the result writes the closing one.</summary>
    public Block Open(string header, string close = "}")
    {
        Line(header);
        Line("{");
        _depth++;
        return new Block(this, close);
    }

    public override string ToString() => _builder.ToString();

    internal readonly struct Block : IDisposable
    {
        private readonly IndentedWriter _writer;
        private readonly string _close;

        public Block(IndentedWriter writer, string close)
        {
            _writer = writer;
            _close = close;
        }

        public void Dispose()
        {
            _writer._depth--;
            _writer.Line(_close);
        }
    }
}
